"""Issue 14 (security and bad input), redaction items: binary artifacts under the policy,
detectors on text artifacts, more credential families, masks that are not findings, and
secrets in metadata keys and artifact names."""

from __future__ import annotations

import base64
import json
import os
import random
import string
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from casruns.redaction import ANCHORED, DETECTORS, TRIGGERS, Redactor, looks_binary
from casruns.tree import SMALL, collect
from conftest import cli, cli_json

R = random.Random(14)
AN = string.ascii_letters + string.digits
B64U = AN + "_-"
HEX = "0123456789abcdef"
UP = string.ascii_uppercase + string.digits
SECRET = "Zq9-decl4red-s3cret"


def rnd(alphabet: str, n: int) -> str:
    return "".join(R.choice(alphabet) for _ in range(n))


# -- detectors: one positive (text, the part that must go) and one near miss per family -------------

_uuid = "8d2c4f3e-1a2b-4c3d-9e8f-0a1b2c3d4e5f"
_sig = rnd(HEX, 64)
POSITIVE: dict[str, tuple[str, str]] = {}
NEGATIVE: dict[str, str] = {}


def case(name: str, secret: str, negative: str, text: str | None = None) -> None:
    POSITIVE[name] = (text or f"using {secret} now", secret)
    NEGATIVE[name] = negative


case("bearer_token", "eyJhbGciOiJIUzI1NiJ9abcdefgh", "Authorization required: Bearer realm=x", "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9abcdefgh")
case("basic_auth", "dXNlcjpwYXNzd29yZA==", "Authorization: Basic realm", "authorization: Basic dXNlcjpwYXNzd29yZA==")
case("url_credentials", "sup3rs3cret", "https://example.com/path@v1", "mysql://wp:sup3rs3cret@db:3306/wp")
case("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijkl", "eyJhbGciOiJIUzI1NiJ9 alone")
case("secret_assignment", "hunter2hunter2", "tokens=3 passwords=", "DB_PASSWORD=hunter2hunter2")
case("github_token", "ghp_" + rnd(AN, 36), "ghp_" + rnd(AN, 20))
case("gitlab_token", "glrt-" + rnd(B64U, 20), "glrt-short gldt-x glpat-tiny")
case("npm_token", "npm_" + rnd(AN, 36), "npm_config_cache=/home/u/.npm npm_" + rnd(AN, 35))
case("pypi_token", "pypi-AgEIcHlwaS5vcmc" + rnd(B64U, 60), "pypi-AgEIcHlwaS5vcmc" + rnd(B64U, 10) + " pypi-simple")
case("rubygems_token", "rubygems_" + rnd(HEX, 48), "rubygems_" + rnd(HEX, 47))
case("docker_token", "dckr_pat_" + rnd(B64U, 27), "dckr_pat_short")
case("jfrog_token", "AKCp" + rnd(AN, 69), "AKCp" + rnd(AN, 10))
case("aws_access_key_id", "AKIA" + rnd(UP.replace("0", ""), 16), "AKIA" + rnd(UP, 10))
case("aws_secret_access_key", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = short",
     "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
case("aws_signature", _sig, "X-Amz-Signature=abc&X-Amz-SignedHeaders=host",
     "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z"
     f"&X-Amz-SignedHeaders=host&X-Amz-Signature={_sig} 200")
case("google_api_key", "AIza" + rnd(B64U, 35), "AIza" + rnd(AN, 10))
case("google_oauth", "GOCSPX-" + rnd(B64U, 28), "ya29.abc GOCSPX-short")
case("azure_account_key", rnd(AN + "+/", 86) + "==", "AccountKey=;AccountName=x",
     "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={s};EndpointSuffix=core.windows.net")
case("azure_sas_signature", rnd(AN, 43) + "%3D", "config sig=" + rnd(AN, 43) + " ?sig=short",
     "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig={s}")
case("azure_client_secret", "abc8Q~" + rnd(AN + "_~.-", 34), "abc8Q~short xyzQ~" + rnd(AN, 34))
case("alibaba_access_key_id", "LTAI" + rnd(AN, 20), "LTAI" + rnd(AN, 8))
case("digitalocean_token", "dop_v1_" + rnd(HEX, 64), "dop_v1_" + rnd(HEX, 63))
case("heroku_api_key", "HRKU-" + rnd(B64U, 60), "HRKU-" + rnd(AN, 10))
case("databricks_token", "dapi" + rnd(HEX, 32), "rapidapi dapi" + rnd(HEX, 31))
case("vault_token", "hvs." + rnd(B64U, 90), "hvs.short")
case("terraform_token", rnd(AN, 14) + ".atlasv1." + rnd(B64U, 67), rnd(AN, 14) + ".atlasv1.short")
case("pulumi_token", "pul-" + rnd(HEX, 40), "pul-" + rnd(HEX, 39))
case("doppler_token", "dp.pt." + rnd(AN, 43), "dp.pt.abc")
case("onepassword_token", "ops_eyJ" + rnd(AN + "+/", 250), "ops_eyJabc")
case("planetscale_token", "pscale_tkn_" + rnd(B64U, 43), "pscale_tkn_abc")
case("supabase_token", "sbp_" + rnd(HEX, 40), "sbp_" + rnd(HEX, 39))
case("grafana_token", "glsa_" + rnd(AN, 32) + "_" + rnd(HEX, 8), "glsa_short glc_short")
case("new_relic_key", "NRAK-" + rnd(UP, 27), "NRAK-" + rnd(UP, 26))
case("sentry_token", "sntrys_eyJ" + rnd(AN, 60), "sntrys_x")
case("dynatrace_token", "dt0c01." + rnd(UP, 24) + "." + rnd(UP, 64), "dt0c01.ABC")
case("buildkite_token", "bkua_" + rnd(HEX, 40), "bkua_" + rnd(HEX, 39))
case("circleci_token", "CCIPAT_" + rnd(AN, 22) + "_" + rnd(HEX, 40), "CCIPAT_abc")
case("slack_token", "xapp-1-A" + rnd(UP, 10) + "-" + rnd(HEX, 20), "xapp-1 xox")
case("slack_webhook", "services/T" + rnd(UP, 8) + "/B" + rnd(UP, 8) + "/" + rnd(AN, 24), "https://hooks.slack.com/help",
     "curl https://hooks.slack.com/{s} -d ok")
case("discord_webhook", rnd(string.digits, 18) + "/" + rnd(B64U, 68), "https://discord.com/api/webhooks/123",
     "https://discord.com/api/webhooks/{s}")
case("teams_webhook", f"webhookb2/{_uuid}@{_uuid}/IncomingWebhook/{rnd(HEX, 32)}/{_uuid}", "https://contoso.webhook.office.com/webhookb2/",
     "https://contoso.webhook.office.com/{s}")
case("sendgrid_key", "SG." + rnd(B64U, 22) + "." + rnd(B64U, 43), "msg." + rnd(B64U, 22) + "." + rnd(B64U, 43))
case("brevo_key", "xkeysib-" + rnd(HEX, 64) + "-" + rnd(AN, 16), "xkeysib-abc")
case("mailgun_key", "key-" + rnd(HEX, 32), "cache key-" + rnd(HEX, 16) + " monkey-" + rnd(HEX, 32))
case("mailchimp_key", rnd(HEX, 32) + "-us12", "Accept-Language: en-us,en " + rnd(HEX, 31) + "-us12")
case("twilio_api_key", "SK" + rnd(HEX, 32), "TASK" + rnd(HEX, 32) + " SK" + rnd(HEX, 31))
case("postman_key", "PMAK-" + rnd(HEX, 24) + "-" + rnd(HEX, 34), "PMAK-" + rnd(HEX, 24))
case("linear_key", "lin_api_" + rnd(AN, 40), "lin_api_" + rnd(AN, 39))
case("atlassian_token", "ATATT3" + rnd(B64U, 186), "ATATT3xyz")
case("contentful_token", "CFPAT-" + rnd(B64U, 43), "CFPAT-abc")
case("shopify_token", "shpat_" + rnd(HEX, 32), "shpat_" + rnd(HEX, 31))
case("square_token", "sq0atp-" + rnd(B64U, 22), "sq0atp-abc")
case("stripe_key", "whsec_" + rnd(AN, 32), "whsec_abc sk_live_short")
case("easypost_key", "EZAK" + rnd(AN, 54), "EZAK" + rnd(AN, 20))
case("mapbox_secret_token", "sk.eyJ" + rnd(B64U, 60) + "." + rnd(B64U, 22), "sk.eyJshort pk.eyJ" + rnd(B64U, 60))
case("age_secret_key", "AGE-SECRET-KEY-1" + rnd(UP, 58), "AGE-SECRET-KEY-1ABC")
case("openai_key", "sk-proj-" + rnd(B64U, 40), "sk-1 task-list")
case("anthropic_key", "sk-ant-api03-" + rnd(B64U, 93) + "AA", "sk-ant-short")
case("huggingface_token", "hf_" + rnd(string.ascii_letters, 34), "hf_hub_download(repo_id)")
case("groq_key", "gsk_" + rnd(AN, 52), "gsk_" + rnd(AN, 10))
case("replicate_token", "r8_" + rnd(AN, 37), "r8_" + rnd(AN, 36))
case("perplexity_key", "pplx-" + rnd(AN, 48), "pplx-abc")
case("langsmith_key", "lsv2_pt_" + rnd(HEX, 32) + "_" + rnd(HEX, 10), "lsv2_pt_abc")


def test_every_detector_has_a_positive_and_a_negative_case():
    assert set(POSITIVE) == set(DETECTORS) == set(NEGATIVE)


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_detector_masks_its_family(name):
    text, secret = POSITIVE[name]
    text = text.replace("{s}", secret)
    alone = Redactor({}, {name: DETECTORS[name]}).text(text)
    assert secret not in alone and f"[REDACTED:{name}]" in alone, alone
    out = Redactor({}, DETECTORS).text(text)  # overlapping detectors may name the mask
    assert secret not in out and "[REDACTED:" in out, out


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_detector_leaves_near_misses_alone(name):
    assert Redactor({}, DETECTORS).text(NEGATIVE[name]) == NEGATIVE[name]


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_detector_is_switchable_in_config(name, tmp_path):
    from plugins.redact import casruns_redaction

    (tmp_path / "config.toml").write_text(f"[redaction.detectors]\n{name} = false\n")
    patterns = casruns_redaction(run=SimpleNamespace(registry_root=str(tmp_path)))["patterns"]
    assert name not in patterns and len(patterns) == len(DETECTORS) - 1
    text, secret = POSITIVE[name]
    assert f"[REDACTED:{name}]" not in Redactor({}, patterns).text(text.replace("{s}", secret))


def test_detectors_stay_trigger_anchored():
    assert all(TRIGGERS[name] for name in DETECTORS)
    assert set(DETECTORS) - ANCHORED == {"url_credentials", "stripe_key"}  # the two whose trigger sits inside


def test_secret_split_across_lines_is_found_with_a_case_sensitive_trigger():
    r = Redactor({}, DETECTORS).stream()
    token = POSITIVE["sendgrid_key"][1]
    out = r.feed(b"a\nkey " + token[:5].encode()) + r.feed(token[5:].encode() + b"\nb\n") + r.close()
    assert token.encode() not in out and b"[REDACTED:sendgrid_key]" in out


def test_gcp_service_account_json_is_masked():
    doc = json.dumps({"type": "service_account", "private_key_id": rnd(HEX, 40),
                      "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nabcdef\n-----END PRIVATE KEY-----\n"})
    out = Redactor({}, DETECTORS).text(doc)
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in out and json.loads(doc)["private_key_id"] not in out


# -- a masked value is not a finding ----------------------------------------------------------------


def hits(text: str | bytes) -> dict:
    s = Redactor({}, DETECTORS).stream()
    s.feed(text.encode() if isinstance(text, str) else text)
    s.close()
    return s.hits


def test_already_masked_url_credentials_and_private_key_are_not_findings():
    assert hits("git clone https://user:[REDACTED:url_credentials]@github.com/x\n") == {}
    assert hits("-----BEGIN RSA PRIVATE KEY-----\n[REDACTED:private_key]\n[REDACTED:private_key]\n\n-----END RSA PRIVATE KEY-----\nok\n") == {}
    assert hits(json.dumps({"k": "-----BEGIN PRIVATE KEY-----[REDACTED:private_key]-----END PRIVATE KEY-----"}) + "\n") == {}
    assert hits("https://user:[REDACTED:T]tail@host\n") == {"url_credentials": 1}  # something besides a mask: report it


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_redacted_output_has_no_findings(name):
    text, secret = POSITIVE[name]
    once = Redactor({}, DETECTORS).text(text.replace("{s}", secret) + "\n")
    assert hits(once) == {}


def test_scan_of_a_clean_run_finds_nothing(casruns_home):
    cli("init", check=0)
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabcdefghijklmnop\n-----END RSA PRIVATE KEY-----"
    script = f'echo "git clone https://bob:hunter2hunter2@example.com/r"; printf "%s\\n" "{key}"'
    _, out = cli_json("submit", "--", "sh", "-c", script)
    rid = out[0]["run_id"]
    cli("wait", rid, "--timeout", "30", check=0)
    assert "hunter2hunter2" not in cli("logs", rid).stdout
    proc, out = cli_json("scan")
    assert out[0]["findings"] == [] and proc.returncode == 0


# -- artifacts: binary files under the policy, detectors on text, names ------------------------------


def test_binary_classification():
    assert not looks_binary(b"2026-01-01 INFO started\x00 worker 3\n" * 50)  # a stray NUL in a UTF-8 log
    assert not looks_binary(b"")
    assert looks_binary(bytes(R.randrange(256) for _ in range(8192)))  # compressed or random data
    assert looks_binary("hello wide world".encode("utf-16-le"))
    assert looks_binary(b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56)


def collect_one(registry, tmp_path, files: dict[str, bytes], policy: str, values=None, patterns=DETECTORS):
    d = tmp_path / "arts"
    d.mkdir(exist_ok=True)
    for name, data in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    tree = collect(d, registry.store, redactor=Redactor({"TOK": SECRET} if values is None else values, patterns), policy=policy)
    return {e.path: e for e in tree.entries}, tree.skipped


def stored(registry, entry) -> bytes:
    return registry.store.read_bytes(entry.blake3)


STRAY_NUL_LOG = b"step 1 ok\n\x00step 2 token is " + SECRET.encode() + b"\nstep 3\n"
BINARY = bytes(range(256)) * 8 + SECRET.encode() + b"\x00\x01" + SECRET.encode("utf-16-le") + b"\x00" * 100


def test_a_stray_nul_does_not_get_a_secret_past_reject(registry, tmp_path):
    entries, skipped = collect_one(registry, tmp_path, {"ci.log": STRAY_NUL_LOG, "data.bin": BINARY}, "reject")
    assert entries == {}
    assert {s["path"] for s in skipped} == {"ci.log", "data.bin"}
    assert all("artifact_policy is reject" in s["reason"] and SECRET not in s["reason"] for s in skipped)


def test_binary_artifact_is_masked_byte_for_byte_under_redact(registry, tmp_path):
    entries, _ = collect_one(registry, tmp_path, {"data.bin": BINARY, "ci.log": STRAY_NUL_LOG}, "redact")
    e = entries["data.bin"]
    data = stored(registry, e)
    assert len(data) == len(BINARY) == e.size
    assert SECRET.encode() not in data and SECRET.encode("utf-16-le") not in data
    wide = SECRET.encode("utf-16-le")
    assert data == BINARY.replace(SECRET.encode(), b"*" * len(SECRET)).replace(wide, b"*" * len(wide))
    assert e.extra["secrets"] == "redacted" and e.extra["binary"] is True and e.extra["secret_matches"] == 2
    # the log with one NUL is still text: redacted with the usual mask
    assert stored(registry, entries["ci.log"]) == STRAY_NUL_LOG.replace(SECRET.encode(), b"[REDACTED:TOK]")
    assert "binary" not in entries["ci.log"].extra


def test_binary_artifact_under_flag_is_stored_unchanged_and_flagged(registry, tmp_path):
    entries, _ = collect_one(registry, tmp_path, {"data.bin": BINARY}, "flag")
    assert stored(registry, entries["data.bin"]) == BINARY
    assert entries["data.bin"].extra["secrets"] == "flagged"


def test_binary_scan_is_streaming_across_chunk_boundaries(registry, tmp_path):
    cut = 8192 + SMALL - 7  # the first read is 8 KiB, then 1 MiB pieces
    data = bytearray(os.urandom(3 * SMALL))
    data[cut : cut + len(SECRET)] = SECRET.encode()
    entries, _ = collect_one(registry, tmp_path, {"big.bin": bytes(data)}, "redact")
    out = stored(registry, entries["big.bin"])
    assert len(out) == len(data) and out[cut : cut + len(SECRET)] == b"*" * len(SECRET)


def test_text_artifacts_pass_the_detectors_under_the_policy(registry, tmp_path):
    token = POSITIVE["github_token"][1]
    log = f"$ git push\nremote: using {token}\n".encode()
    for policy in ("redact", "flag", "reject"):
        (tmp_path / policy).mkdir()
        entries, skipped = collect_one(registry, tmp_path / policy, {"ci.log": log, "ok.txt": b"fine\n"}, policy, values={})
        assert "secrets" not in entries["ok.txt"].extra
        if policy == "reject":
            assert "ci.log" not in entries and skipped[0]["path"] == "ci.log"
            continue
        e = entries["ci.log"]
        assert e.extra["secrets"] == ("redacted" if policy == "redact" else "flagged")
        assert e.extra["secret_names"] == ["github_token"]
        assert (token.encode() in stored(registry, e)) == (policy == "flag")


def test_secrets_in_paths_and_link_targets_are_masked(registry, tmp_path):
    token = POSITIVE["github_token"][1]
    d = tmp_path / "arts"
    (d / f"dir-{SECRET}").mkdir(parents=True)
    (d / f"dir-{SECRET}" / "a.txt").write_bytes(b"clean\n")
    (d / f"out-{token}.txt").write_bytes(b"clean\n")
    (d / f"leak-{SECRET}.env").write_bytes(f"v={SECRET}\n".encode())
    os.symlink(f"dir-{SECRET}/a.txt", d / "link")
    (d / "a-[REDACTED:TOK]").write_bytes(b"x")  # what a masked name would collide with
    (d / f"a-{SECRET}").write_bytes(b"y")
    tree = collect(d, registry.store, redactor=Redactor({"TOK": SECRET}, DETECTORS), policy="reject")
    listing = tree.to_bytes().decode()
    assert SECRET not in listing and token not in listing
    paths = {e.path: e for e in tree.entries}
    assert "dir-[REDACTED:TOK]/a.txt" in paths and "out-[REDACTED:github_token].txt" in paths
    assert paths["link"].target == "dir-[REDACTED:TOK]/a.txt" and paths["link"].extra["name_redacted"] is True
    assert paths["a-[REDACTED:TOK]"].blake3 == registry.store.put_bytes(b"x").address  # the real one wins
    reasons = {s["path"]: s["reason"] for s in tree.skipped}
    assert "artifact_policy is reject" in reasons["leak-[REDACTED:TOK].env"]
    assert "another entry's name" in reasons["a-[REDACTED:TOK]"]


# -- metadata keys ----------------------------------------------------------------------------------


def test_metadata_keys_are_redacted():
    token = POSITIVE["github_token"][1]
    r = Redactor({"TOK": SECRET}, DETECTORS)
    out = r.metadata({SECRET: "v", "nested": {token: 1, "token": "[REDACTED:TOK]"}, "ok": "fine"})
    assert out == {"[REDACTED:TOK]": "v", "nested": {"[REDACTED:github_token]": 1, "token": "[REDACTED:TOK]"}, "ok": "fine"}


def test_end_to_end_label_keys_artifact_names_and_text_artifacts(casruns_home):
    cli("init", check=0)
    token = POSITIVE["npm_token"][1]
    script = (
        'mkdir -p "$CASRUNS_ARTIFACTS_DIR/by-$TOK"; echo hi > "$CASRUNS_ARTIFACTS_DIR/by-$TOK/f.txt"; '
        f'echo "npm publish with {token}" > "$CASRUNS_ARTIFACTS_DIR/ci.log"'
    )
    _, out = cli_json("submit", "--secret-env", "TOK", "--label", f"{SECRET}=v", "--", "sh", "-c", script, env={"TOK": SECRET})
    rid = out[0]["run_id"]
    cli("wait", rid, "--timeout", "30", check=0)
    shown = cli("status", rid, "--json").stdout + cli("artifacts", rid, "--json").stdout + cli("cat", rid, "ci.log").stdout
    assert SECRET not in shown and token not in shown
    assert "[REDACTED:TOK]" in shown and "[REDACTED:npm_token]" in shown
    _, arts = cli_json("artifacts", rid)
    assert {e["path"] for e in arts[0]["entries"]} == {"by-[REDACTED:TOK]/f.txt", "ci.log"}


def test_spec_lists_every_detector_with_its_triggers():
    from conftest import SPEC

    section = (SPEC / "format.md").read_text().split("## Redaction\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(" `"): line for line in section.splitlines() if line.startswith("| `")}
    assert set(rows) == set(DETECTORS)
    for name, row in rows.items():
        shown = row.split("|")[3]
        # each trigger word is in the row (a word made rarer by a following character, by its stem)
        assert all(w.decode().rstrip("0123456789abcdef") in shown or w.decode() in shown for w in TRIGGERS[name]), name


def test_binary_artifact_without_declared_values_is_stored_as_is(registry, tmp_path):
    # detectors read text; in a binary file their regexes would find noise, so only declared values count there
    data = bytes(range(256)) * 4 + POSITIVE["github_token"][1].encode()
    entries, _ = collect_one(registry, tmp_path, {"x.bin": data}, "reject", values={})
    assert stored(registry, entries["x.bin"]) == data and entries["x.bin"].extra == {}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(["raw", "utf-16-le", "utf-16-be", "b64"])), max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=20),
)
def test_binary_stream_keeps_length_and_leaves_no_form_of_the_value(pieces, cuts):
    forms = {"raw": SECRET.encode(), "utf-16-le": SECRET.encode("utf-16-le"), "utf-16-be": SECRET.encode("utf-16-be"),
             "b64": base64.b64encode(b"\x00\x01" + SECRET.encode() + b"\x02")}
    data = b"".join(forms[p] if isinstance(p, str) else p for p in pieces)
    r = Redactor({"TOK": SECRET}).binary_stream()
    out, pos = [], 0
    for c in cuts:
        out.append(r.feed(data[pos : pos + c]))
        pos += c
    out.append(r.feed(data[pos:]))
    out.append(r.close())
    result = b"".join(out)
    assert len(result) == len(data)
    for form in list(forms.values())[:3]:
        assert form not in result


def test_one_redaction_policy_honours_the_config_switches_everywhere(tmp_path):
    """The supervisor's fallback redactor used to ignore [redaction.detectors]; now the CLI,
    the supervisor and its fallbacks build it through one function."""
    from casruns.redaction import policy

    token = "ghp_" + "A1" * 18
    on = policy({}, {})
    off = policy({"detectors": {"github_token": False}}, {})
    assert token not in on.text(f"x {token} y")
    assert token in off.text(f"x {token} y")
    custom = policy({"patterns": {"mine": r"ZZ-\d{6}"}}, {"S": "declaredvalue1"})
    out = custom.text("ZZ-123456 declaredvalue1")
    assert "ZZ-123456" not in out and "declaredvalue1" not in out
