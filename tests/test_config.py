"""The config loader and `pickupd check`: real TOML files, real exit codes."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import manual, pickupd

from pickupd.auth.logins import Credentials, Secret
from pickupd.config.loading import load
from pickupd.errors import ConfigError

GOOD = """
[spool]
path = "spool"

[relays.main]
host = "smtp.example.com"
port = 587
username = "relay"
password_file = "relay.pw"

[relays.local]
host = "127.0.0.1"
port = 2525
security = "none"

[senders."app@example.com"]
relay = "main"
username = "app"
password_env = "PICKUPD_TEST_APP_PW"

[senders."*@example.com"]
relay = "local"
"""


def write(tmp_path: Path, text: str, name: str = "pickupd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


@pytest.fixture
def good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "relay.pw").write_text("s3cret\n")
    (tmp_path / "relay.pw").chmod(0o600)
    monkeypatch.setenv("PICKUPD_TEST_APP_PW", "app-secret")
    return write(tmp_path, GOOD)


def test_good_config_loads_with_defaults(good: Path) -> None:
    """A valid file gives typed values, defaults where unset, paths relative to the file."""
    config = load(good)
    assert config.spool.path == good.parent / "spool"
    main = config.relays["main"]
    assert (main.host, main.port, main.security, main.timeout) == (
        "smtp.example.com",
        587,
        "starttls",
        30.0,
    )
    assert isinstance(main.credentials, Credentials)
    assert main.credentials.password.reveal() == "s3cret"
    assert config.relays["local"].credentials is None
    assert config.retry.schedule == (60.0, 300.0, 900.0, 3600.0, 7200.0, 14400.0)
    assert config.retry.max_age == 5 * 86400
    assert config.policy.max_message_size == 25 * 1024 * 1024
    assert config.dispatch.settle == 1.0 and config.dispatch.rescan_interval == 30.0
    rule = config.sender_rule("APP@Example.COM")
    assert rule is not None and rule.credentials is not None
    assert rule.credentials.username == "app"
    domain_rule = config.sender_rule("other@example.com")
    assert domain_rule is not None and domain_rule.relay == "local"
    assert config.sender_rule("app@example.com.evil") is None


def test_secrets_never_print_themselves(good: Path) -> None:
    """repr/str of the config, and of a Secret, never show a password."""
    config = load(good)
    text = repr(config) + str(config.relays["main"])
    assert "s3cret" not in text and "app-secret" not in text
    assert str(Secret("x")) == "Secret('***')"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[relays.main]\nhost = "h"\nport = "abc"\n[senders."a@b.c"]\nrelay = "main"\n',
            'relays.main.port: expected an integer from 1 to 65535, got "abc"',
        ),
        (
            '[relays.main]\nhost = "h"\nprot = 25\n[senders."a@b.c"]\nrelay = "main"\n',
            'relays.main.prot: unknown key (did you mean "port"?)',
        ),
        (
            '[relays.main]\nhost = "h"\n[senders."a@b.c"]\nrelay = "mian"\n',
            'senders."a@b.c".relay: no relay named "mian" (relays: main)',
        ),
        (
            '[retry]\nschedule = ["1m", "soon"]\n[relays.m]\nhost = "h"\n'
            '[senders."a@b.c"]\nrelay = "m"\n',
            'retry.schedule: expected a duration like "250ms", "30s", "5m", "2h" or "5d", '
            'got "soon"',
        ),
        (
            '[relays.m]\nhost = "mail.example.com"\nsecurity = "none"\nusername = "u"\n'
            'password = "p"\n[senders."a@b.c"]\nrelay = "m"\n',
            "relays.m.username: credentials would be sent in clear to mail.example.com",
        ),
        ('[spool]\nkeep_sent = "yes"\n', "spool.keep_sent: expected true or false"),
        # The words come from the key's converter and its range, never written by hand.
        (
            "[policy]\nmax_recipients = 200000\n",
            "policy.max_recipients: expected an integer from 1 to 100000, got 200000",
        ),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.auth: expected one of "password", "oauth2", got "oauth"',
        ),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth2"\ntoken_command = "get-token"\n'
            '[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.token_command: expected an array like ["/usr/local/bin/cmd", "--flag"]',
        ),
        ("[relays.m]\nport = 25\n", "relays.m.host: required"),
        ('[senders."not-an-address"]\nrelay = "x"\n', 'senders."not-an-address": expected'),
        ("[spool\n", "not valid TOML"),
        ("[bogus]\n", "bogus: unknown section"),
        ("[sendrs]\n", 'sendrs: unknown section (did you mean "senders"?)'),
        (
            '[relays.m]\nhost = "h"\nsecurity = "startls"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.security: expected one of "starttls", "tls", "none", got "startls"'
            ' (did you mean "starttls"?)',
        ),
        (
            '[relays.m]\nhost = "h"\nrate = "30 per minute"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.rate: expected a rate like "30/min", "5/s", "1000/h" or "10000/day"',
        ),
        (
            '[relays.m]\nhost = "h"\n[senders."a@b.c"]\nrelay = "m"\nrate = "0/s"\n',
            'senders."a@b.c".rate: expected a rate like',
        ),
        ('[policy]\nlocal_domain = "not a domain"\n', "policy.local_domain: expected a domain"),
        ('[metrics]\nlisten = "9464"\n', 'metrics.listen: expected "host:port"'),
        ('[metrics]\nlisten = "127.0.0.1:99999"\n', 'metrics.listen: expected "host:port"'),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth2"\n[senders."a@b.c"]\nrelay = "m"\n',
            "relays.m.auth: oauth2 needs a token source: tenant (Microsoft 365)",
        ),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth2"\ntenant = "t"\nclient_secret = "x"\n'
            '[senders."a@b.c"]\nrelay = "m"\n',
            "relays.m.client_id: required with tenant",
        ),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth2"\ntenant = "t"\nclient_id = "c"\n'
            '[senders."a@b.c"]\nrelay = "m"\n',
            "relays.m.client_id: needs either client_secret_file (or _env), or",
        ),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth2"\ntoken_command = ["t"]\npassword = "p"\n'
            '[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.password: not used with auth = "oauth2"',
        ),
        (
            '[relays.m]\nhost = "h"\ntenant = "t"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.tenant: goes with auth = "oauth2"',
        ),
        (
            '[relays.m]\nhost = "h"\nauth = "oauth2"\ntoken_url = "http://x/token"\n'
            'client_id = "c"\nrefresh_token_file = "rt"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.token_url: expected an https:// URL, like "https://host/path"',
        ),
        (
            '[relays.m]\nprovider = "ses"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.region: required with provider = "ses"',
        ),
        (
            '[relays.m]\nprovider = "yahoo"\n[senders."a@b.c"]\nrelay = "m"\n',
            'relays.m.provider: expected one of "microsoft365", "google", "ses"',
        ),
    ],
)
def test_problems_name_the_file_and_key_path(tmp_path: Path, toml: str, expected: str) -> None:
    """Each problem is one line: `file: key.path: problem`."""
    path = write(tmp_path, toml)
    found = problems(path)
    assert any(line.startswith(f"{path}: ") and expected in line for line in found), found


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    """The loader collects every problem instead of stopping at the first."""
    path = write(tmp_path, '[relays.m]\nport = 0\ntimeout = "x"\n[senders."a@b.c"]\nrelay = "q"\n')
    assert len(problems(path)) >= 4


def with_password_file(tmp_path: Path, content: str, mode: int) -> Path:
    """A config whose relay reads its password from the file `pw` (written with `mode`)."""
    (tmp_path / "pw").write_text(content)
    (tmp_path / "pw").chmod(mode)
    return write(
        tmp_path,
        '[relays.m]\nhost = "h"\nusername = "u"\npassword_file = "pw"\n'
        '[senders."a@b.c"]\nrelay = "m"\n',
    )


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A password file others can read is a config error (as ssh and msmtp refuse it)."""
    path = with_password_file(tmp_path, "secret\n", 0o644)
    (line,) = problems(path)
    assert "relays.m.password_file" in line and "can be read or written by others" in line
    assert "secret" not in line


def test_config_with_inline_password_must_be_private(tmp_path: Path) -> None:
    """A config file that holds a password itself must not be readable by others."""
    path = write(
        tmp_path,
        '[relays.m]\nhost = "h"\nusername = "u"\npassword = "hunter2"\n'
        '[senders."a@b.c"]\nrelay = "m"\n',
    )
    load(path)
    path.chmod(0o644)
    (line,) = problems(path)
    assert "others can read it" in line and "hunter2" not in line


def test_config_with_any_inline_secret_must_be_private(tmp_path: Path) -> None:
    """The same for an inline client_secret and the store's password: a config that holds
    one is not readable by others (it used to pass with anything but a relay's password)."""
    for inline in (
        '[relays.m]\nhost = "h"\nauth = "oauth2"\ntenant = "t"\nclient_id = "c"\n'
        'client_secret = "hunter2"\n[senders."a@b.c"]\nrelay = "m"\n',
        '[limits]\nstore = "redis://127.0.0.1/0"\npassword = "hunter2"\n[relays.m]\nhost = "h"\n'
        '[senders."a@b.c"]\nrelay = "m"\n',
    ):
        path = write(tmp_path, inline)
        path.chmod(0o644)
        found = problems(path)
        assert any("holds a secret but others can read it" in line for line in found), found
        assert all("hunter2" not in line for line in found)


def test_password_file_single_trailing_newline_is_ignored(tmp_path: Path) -> None:
    """`echo secret > file` works: one trailing newline is not part of the password."""
    path = with_password_file(tmp_path, "pa ss\n\n", 0o600)
    creds = load(path).relays["m"].credentials
    assert isinstance(creds, Credentials) and creds.password.reveal() == "pa ss\n"


def test_check_command_exit_codes(tmp_path: Path, good: Path) -> None:
    """`pickupd check` exits 0 on a good config and 78 with one line per problem on a bad
    one; `run` refuses a bad config the same way; a usage error exits 64."""
    ok = pickupd("check", "-c", str(good), env={"PICKUPD_TEST_APP_PW": "x"})
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = write(tmp_path, '[relays.main]\nhost = "h"\nport = "abc"\n', "bad.toml")
    result = pickupd("check", "-c", str(bad))
    assert result.returncode == 78
    assert (
        f'{bad}: relays.main.port: expected an integer from 1 to 65535, got "abc"' in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert pickupd("run", "-c", str(bad)).returncode == 78
    via_env = pickupd("check", env={"PICKUPD_CONFIG": str(bad)})
    assert via_env.returncode == 78 and str(bad) in via_env.stderr
    missing = pickupd("check", "-c", str(tmp_path / "nope.toml"))
    assert missing.returncode == 78 and "nope.toml: cannot read config" in missing.stderr
    assert pickupd("frobnicate").returncode == 64
    assert pickupd("run", "--bogus").returncode == 64


def test_run_with_an_unusable_spool_says_so_in_one_line(tmp_path: Path) -> None:
    """A spool path that cannot be created is one clear line naming the key, exit 78, and
    no traceback."""
    (tmp_path / "a-file").write_text("not a directory")
    path = write(
        tmp_path,
        f'[spool]\npath = "{tmp_path}/a-file/spool"\n[relays.m]\nhost = "127.0.0.1"\n'
        'security = "none"\n[senders."a@b.c"]\nrelay = "m"\n',
    )
    result = pickupd("run", "-c", str(path))
    assert result.returncode == 78
    assert "spool.path: cannot create" in result.stderr and "Traceback" not in result.stderr


def test_operations_keys_load(tmp_path: Path) -> None:
    """The keys issue 3 adds: rates (also /s, /h, /day), local_domain, metrics listen."""
    path = write(
        tmp_path,
        '[policy]\nlocal_domain = "Example.COM"\n[metrics]\nlisten = "[::1]:9464"\n'
        '[relays.m]\nhost = "h"\nrate = "100/min"\n'
        '[senders."a@b.c"]\nrelay = "m"\nrate = "10000/day"\n'
        '[senders."*@b.c"]\nrelay = "m"\nrate = "2/s"\n',
    )
    config = load(path)
    assert config.policy.local_domain == "example.com"
    assert config.metrics.listen == ("::1", 9464)
    assert (config.relays["m"].rate.count, config.relays["m"].rate.per) == (100, 60.0)  # type: ignore[union-attr]
    rates = [str(rule.rate) for rule in config.senders]
    assert rates == ["10000/day", "2/s"]


def test_shipped_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """etc/pickupd.toml, with its password files put in a temp folder, loads as documented."""
    example = (Path(__file__).parent.parent / "etc" / "pickupd.toml").read_text()
    for name in ("main.password", "billing.password", "m365.secret", "google-sa.json"):
        (tmp_path / name).write_text("pw\n")
        (tmp_path / name).chmod(0o600)
    monkeypatch.setenv("PICKUPD_SES_PASSWORD", "pw")
    config = load(write(tmp_path, example.replace("/etc/pickupd/secrets/", f"{tmp_path}/")))
    assert sorted(config.relays) == ["google", "m365", "main", "ses"]
    assert config.relays["m365"].host == "smtp.office365.com"
    assert [rule.pattern for rule in config.senders] == [
        "billing@example.com",
        "*@contoso.com",
        "*@example.net",
        "*@example.com",
        "alerts@example.org",
    ]
    assert [str(x) for x in config.senders[0].limits or ()] == ["30 messages/min"]


def test_every_key_is_documented() -> None:
    """Every key of the one table of keys (config.SECTIONS, relays, senders) is shown in
    etc/pickupd.toml and named in the README; `pickupd init` writes each plain one."""
    from pickupd.cli.init import starter_config
    from pickupd.config.keys import keys
    from pickupd.config.limits import LimitsConfig
    from pickupd.config.loading import SECTIONS, RelayConfig, SenderRule
    from pickupd.config.logins import CREDENTIAL_KEYS

    root = Path(__file__).parent.parent
    example = (root / "etc" / "pickupd.toml").read_text()
    readme = manual()
    starter = starter_config(Path("/etc/pickupd/pickupd.toml"), Path("/var/spool/pickupd"))
    tables = [("relays", RelayConfig), ("senders", SenderRule), ("limits", LimitsConfig)]
    for name, section in [*SECTIONS.items(), *tables]:
        for key in keys(section):
            assert f"{key.name} = " in example, f"{name}.{key.name} not in etc/pickupd.toml"
            assert re.search(rf"\b{key.name}\b", readme), f"{name}.{key.name} not in the README"
            if name in SECTIONS:
                assert f"{key.name} = " in starter, f"{name}.{key.name} not in pickupd init"
    for login_key in sorted(CREDENTIAL_KEYS):
        assert f"{login_key} = " in example, f"{login_key} not in etc/pickupd.toml"
        assert f"`{login_key}`" in readme, f"{login_key} not in the README"


def test_provider_presets_and_oauth2_logins_load(tmp_path: Path) -> None:
    """provider fills the host (SES per region); an OAuth2 login's secret files obey the
    password_file rule; a relay's OAuth2 login without username serves each sender's own
    mailbox."""
    from pickupd.auth.logins import MicrosoftSource, XOAuth2, bind
    from pickupd.config.loading import OAuth2Login

    secret = tmp_path / "m365.secret"
    secret.write_text("s\n")
    secret.chmod(0o644)
    text = (
        '[relays.m365]\nprovider = "microsoft365"\nauth = "oauth2"\ntenant = "contoso"\n'
        'client_id = "app"\nclient_secret_file = "m365.secret"\n'
        '[relays.ses]\nprovider = "ses"\nregion = "eu-west-1"\n'
        '[relays.google]\nprovider = "google"\n'
        '[senders."*@contoso.com"]\nrelay = "m365"\n'
    )
    path = write(tmp_path, text)
    assert any("m365.secret can be read or written by others" in p for p in problems(path))
    secret.chmod(0o600)
    config = load(path)
    assert [r.host for r in config.relays.values()] == [
        "smtp.office365.com",
        "email-smtp.eu-west-1.amazonaws.com",
        "smtp.gmail.com",
    ]
    assert {r.port for r in config.relays.values()} == {587}
    login = config.relays["m365"].credentials
    assert isinstance(login, OAuth2Login) and isinstance(login.source, MicrosoftSource)
    assert login.source.client_secret is not None and "s" not in repr(login.source.client_secret)
    assert bind(login, "sales@contoso.com") == XOAuth2(login.source, "sales@contoso.com")


def test_documented_defaults_are_the_tables_values() -> None:
    """The default each key shows in etc/pickupd.toml and in the README's key tables is the
    value the key table declares (not only the key's name): a default is written once, in
    the code, and the docs must agree with it."""
    from pickupd.config.keys import keys
    from pickupd.config.loading import SECTIONS, RelayConfig, SenderRule
    from pickupd.config.logins import LoginKeys

    root = Path(__file__).parent.parent
    example = (root / "etc" / "pickupd.toml").read_text()
    readme = manual()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| ([^|]*) \|", readme, re.MULTILINE))
    # The OAuth2 table's columns are key | for | meaning, the meaning saying "default `...`".
    for key_name, default in re.findall(
        r"^\| `([a-z_]+)` \| [^|]* \| default (`[^`]*`)", readme, re.MULTILINE
    ):
        rows[key_name] = default
    wrong = []
    tables = [*SECTIONS.items(), ("", RelayConfig), ("", SenderRule), ("", LoginKeys)]
    for name, section in tables:
        for key in keys(section):
            row = rows.get(f"{name}.{key.name}" if name else key.name)
            if not key.shown:
                if row is not None and row.strip().startswith("`"):
                    wrong.append(f"README: {key.name} shows {row.strip()}, but it is unset")
                continue
            if not re.search(rf"^#? ?{key.name} = {re.escape(key.shown)}", example, re.M):
                wrong.append(f"etc/pickupd.toml: no '{key.name} = {key.shown}'")
            if row is None:
                wrong.append(f"README: no row for {name + '.' if name else ''}{key.name}")
            elif row.strip() != f"`{key.shown}`":
                wrong.append(f"README: {key.name} shows {row.strip()}, the code {key.shown}")
    assert not wrong, "\n".join(wrong)


def test_init_shows_unset_keys_with_values_of_their_kind() -> None:
    """A key unset by default is shown commented out with a value it takes (an array for a
    command), never a placeholder that the key would refuse."""
    import tomllib

    from pickupd.cli.init import starter_config

    text = starter_config(Path("/etc/pickupd/pickupd.toml"), Path("/var/spool/pickupd"))
    assert '"..."' not in text
    for line in text.splitlines():
        if line.startswith("# ") and " = " in line:
            key, _, rest = line[2:].partition(" = ")
            value = rest.split(" # ")[0].strip()
            tomllib.loads(f"{key} = {value}")  # each is valid TOML
    assert '# on_failed = ["/usr/local/bin/on-failed", "--json"]' in text


@pytest.mark.skipif(os.geteuid() != 0, reason="useradd needs root (CI is root)")
def test_check_fails_for_a_refresh_token_the_service_cannot_rewrite(tmp_path: Path) -> None:
    """A rotated refresh token is written back as a new file renamed over the old: `check`,
    run by root, fails when the service's user (`pickupd`, created here if missing) cannot
    write its folder, and passes once it can."""
    import grp
    import pwd
    import shutil

    created = False
    group = None  # a pickupd group already there (a partial install): kept as it was
    with contextlib.suppress(KeyError):
        group = grp.getgrnam("pickupd").gr_gid
    try:
        pwd.getpwnam("pickupd")
    except KeyError:
        useradd = shutil.which("useradd")
        assert useradd, "useradd is needed (Debian's passwd package)"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             *(["-g", "pickupd"] if group is not None else []), "pickupd"],
            check=True, timeout=30,
        )  # fmt: skip
        created = True
    # A folder the service's user can reach (pytest's own are root's alone).
    public = Path(tempfile.mkdtemp(prefix="pickupd-state-", dir="/tmp"))
    public.chmod(0o711)
    try:
        state = public / "state"
        state.mkdir(mode=0o700)
        token = state / "other.refresh-token"
        token.write_text("rt\n")
        token.chmod(0o600)
        path = tmp_path / "pickupd.toml"
        path.write_text(
            f'[spool]\npath = "{tmp_path / "spool"}"\n[relays.m]\nhost = "h"\nauth = "oauth2"\n'
            'token_url = "https://login.example.net/t"\nclient_id = "c"\n'
            f'refresh_token_file = "{token}"\n[senders."a@b.c"]\nrelay = "m"\n'
        )
        done = pickupd("check", "-c", str(path))
        assert done.returncode == 78, done.stdout + done.stderr
        assert f"relays.m.refresh_token_file: pickupd cannot write {state}" in done.stderr
        entry = pwd.getpwnam("pickupd")
        os.chown(state, entry.pw_uid, entry.pw_gid)
        os.chown(token, entry.pw_uid, entry.pw_gid)  # the service reads it too
        done = pickupd("check", "-c", str(path))
        assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(public, ignore_errors=True)
        if created:
            subprocess.run(["userdel", "pickupd"], check=False, timeout=30)
            if group is not None and subprocess.run(["getent", "group", "pickupd"]).returncode:
                subprocess.run(["groupadd", "-g", str(group), "pickupd"], check=False, timeout=30)


def test_a_store_url_never_carries_a_password(tmp_path: Path) -> None:
    """`redis://:pw@host` and `redis://host/0?password=pw` (which redis-py would take, past
    the rule that a password goes only over TLS or to loopback) are refused, the key named."""
    for url in ("redis://:hunter2@redis.example.net/0", "redis://redis.example.net/0?password=x"):
        path = write(
            tmp_path,
            f'[limits]\nstore = "{url}"\n[relays.m]\nhost = "h"\n[senders."a@b.c"]\nrelay = "m"\n',
        )
        (line,) = problems(path)
        assert "limits.store: a password does not go in the URL" in line, line
        assert "hunter2" not in line


def test_every_key_says_what_it_takes() -> None:
    """Every key of the one table (sections, relays, senders, the store, logins) is read by a
    converter that says what it takes, in the words its errors use: none falls back to the
    catch-all, so no "expected ..." text is written by hand beside a key."""
    from pickupd.config.keys import expected, keys
    from pickupd.config.limits import LimitsConfig
    from pickupd.config.loading import SECTIONS, RelayConfig, SenderRule
    from pickupd.config.logins import CREDENTIAL_KEYS, PASSWORD_KEYS, LoginKeys, PasswordKeys

    tables = [*SECTIONS.values(), RelayConfig, SenderRule, LimitsConfig, LoginKeys, PasswordKeys]
    vague = [
        f"{section.__name__}.{key.name}"
        for section in tables
        for key in keys(section)
        if expected(key.convert) == "a valid value"
    ]
    assert not vague, vague
    # The login keys the reader knows are exactly the ones the table declares.
    assert {key.name for t in (LoginKeys, PasswordKeys) for key in keys(t)} == CREDENTIAL_KEYS
    assert {key.name for key in keys(PasswordKeys)} == set(PASSWORD_KEYS)
    assert {"host", "port"} <= {key.name for key in keys(RelayConfig)}
    assert "relay" in {key.name for key in keys(SenderRule)}
