"""Microsoft Graph: a relay that sends through `sendMail` where SMTP AUTH is off."""
