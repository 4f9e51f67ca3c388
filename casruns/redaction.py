"""Streaming secret redaction: declared secrets and known credential shapes never reach disk.

A :class:`StreamRedactor` sits between a command's output pipe and its spool file, in two
stages:

1. **Values.** Every declared secret value, and the forms a program is likely to print it
   in (base64 at each of the three byte alignments and in its URL-safe alphabet, as part of
   a longer encoded string; URL-encoded; JSON-escaped; shell-quoted; each line of a
   multi-line value), is replaced with ``[REDACTED:<name>]``. The stage holds back the last
   ``longest form - 1`` bytes it has seen, so a secret split across two reads or two lines
   is still caught. Memory is bounded by that holdback.
2. **Patterns.** Detector regexes (``DETECTORS``, plugin patterns) run over whole lines;
   the stage holds a partial line until its newline (at most ``MAX_LINE`` bytes). Private
   key blocks are masked line by line from BEGIN to END. A built-in detector is tried only
   where one of its literal trigger words occurs (one automaton pass per block), anchored
   there. A match that is only masks already is kept as it is and not counted, so redacting
   twice changes nothing and ``casruns scan`` does not report masks.

Binary files (:func:`looks_binary`) get a third mode, :meth:`Redactor.binary_stream`:
declared values only (also UTF-16), each masked by as many ``*`` bytes as it has, so the
file keeps its size and layout.

Why no flush on idle: emitting a held-back prefix of a secret early would put the secret on
disk in two adjacent pieces, which is the secret itself. A prompt without a newline is
therefore shown when the next output or the end of the stream arrives.

Values shorter than :data:`MIN_SECRET_LEN` or in :data:`COMMON_VALUES` are not treated as
secrets (masking every "1" in a log helps nobody); :func:`split_secrets` returns them so the
run's record says so.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shlex
from collections.abc import Mapping
from urllib.parse import quote, quote_plus

MIN_SECRET_LEN = 6
MAX_LINE = 65536
COMMON_VALUES = frozenset({"true", "false", "null", "none", "yes", "no", "on", "off", "localhost", "password", "secret", "changeme"})

# Built-in detectors for well-known credential shapes: name -> (regex, trigger words, anchor).
# Each regex's group "s" is what gets masked; the rest of the match is kept so the log still
# reads. Trigger words are literals every match contains; a word with an upper-case letter is
# matched case-sensitively, the others in the lower-cased text. ``anchor`` says where a match
# starts: ``0`` at the trigger word, ``n`` n bytes before it (a fixed-length head such as
# Mailchimp's 32 hex digits before ``-us``), ``None`` anywhere on the line holding the word.
# The regexes are our own, written from the token formats the providers document.
_HEX32 = "[0-9a-f]{32}"
_HEX_DIGITS = b"0123456789abcdef"


def _after(words: tuple[bytes, ...], chars: bytes) -> tuple[bytes, ...]:
    """Each word followed by each of ``chars``: a short prefix made rarer ("-us" also starts
    "-user"; "-us1" does not), so its regex is tried less often."""
    return tuple(w + bytes([c]) for w in words for c in chars)


_FAMILIES: dict[str, tuple[str, tuple[bytes, ...], int | None]] = {
    # -- generic shapes ---------------------------------------------------------------------
    "bearer_token": (r"(?i)\bauthorization[ \t]*[:=][ \t]*\"?(?:bearer|token)[ \t]+(?P<s>[A-Za-z0-9._~+/=-]{8,})", (b"authorization",), 0),
    "basic_auth": (r"(?i)\bauthorization[ \t]*[:=][ \t]*\"?basic[ \t]+(?P<s>[A-Za-z0-9+/=]{8,})", (b"authorization",), 0),
    "url_credentials": (r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:(?P<s>[^@\s/]{3,})@", (b"://",), None),
    "jwt": (r"\b(?P<s>eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})", (b"eyj",), 0),
    # NAME=value / "name": "value" where the name says it is a secret.
    "secret_assignment": (
        r"(?i)(?:password|passwd|passphrase|secret|token|api[_-]?key|apikey|access[_-]?key"
        r"|private[_-]?key|credential)[a-z0-9_.-]{0,40}[\"']?[ \t]*[=:][ \t]*"
        r"(?P<q>[\"']?)(?P<s>(?!\[REDACTED)[^\s\"'&;,]{6,})(?P=q)",
        (b"passw", b"passphrase", b"secret", b"token", b"credential", b"apikey", b"api_key", b"api-key",
         b"accesskey", b"access_key", b"access-key", b"privatekey", b"private_key", b"private-key"),
        0,
    ),
    # -- source hosting and package registries ----------------------------------------------
    "github_token": (r"\b(?P<s>(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b",
                     (b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_"), 0),
    "gitlab_token": (r"\b(?P<s>(?:glpat|gldt|glrt|glptt|glcbt|glft|glimt|glsoat|gloas|glagent|glffct)-[A-Za-z0-9_.-]{20,}"
                     r"|GR1348941[A-Za-z0-9_-]{20,})",
                     (b"glpat-", b"gldt-", b"glrt-", b"glptt-", b"glcbt-", b"glft-", b"glimt-", b"glsoat-", b"gloas-",
                      b"glagent-", b"glffct-", b"gr1348941"), 0),
    "npm_token": (r"\b(?P<s>npm_[A-Za-z0-9]{36})(?![A-Za-z0-9])", (b"npm_",), 0),
    "pypi_token": (r"\b(?P<s>pypi-AgE(?:IcHlwaS5vcmc|NdGVzdC5weXBpLm9yZw)[A-Za-z0-9_-]{40,})", (b"pypi-age",), 0),
    "rubygems_token": (r"\b(?P<s>rubygems_[0-9a-f]{48})(?![0-9a-f])", (b"rubygems_",), 0),
    "docker_token": (r"\b(?P<s>dckr_(?:pat|oat)_[A-Za-z0-9_-]{24,})", (b"dckr_pat_", b"dckr_oat_"), 0),
    "jfrog_token": (r"\b(?P<s>AKCp[A-Za-z0-9]{64,})", (b"akcp",), 0),
    # -- cloud providers --------------------------------------------------------------------
    "aws_access_key_id": (r"\b(?P<s>(?:AKIA|ASIA)[0-9A-Z]{16})\b", (b"akia", b"asia"), 0),
    "aws_secret_access_key": (r"(?i)\baws_secret_access_key[ \t]*[=:][ \t]*[\"']?(?P<s>[A-Za-z0-9/+=]{40})",
                              (b"aws_secret_access_key",), 0),
    # pre-signed URL query parameters and the SigV4 Authorization header
    "aws_signature": (
        r"(?i)(?:x-amz-(?:signature|security-token|credential)[ \t]*[=:][ \t]*"
        r"|aws4-hmac-sha256[ \t]+credential=[^\s,]+,[ \t]*signedheaders=[^\s,]+,[ \t]*signature=)"
        r"(?P<s>[^&\s\"'<>,;]{16,})",
        (b"x-amz-signature", b"x-amz-security-token", b"x-amz-credential", b"aws4-hmac-sha256"), 0),
    "google_api_key": (r"\b(?P<s>AIza[0-9A-Za-z_-]{35})", (b"aiza",), 0),
    "google_oauth": (r"\b(?P<s>GOCSPX-[A-Za-z0-9_-]{28}|ya29\.[A-Za-z0-9_-]{20,})", (b"gocspx-", b"ya29."), 0),
    "azure_account_key": (r"(?i)\b(?:account|sharedaccess)key[ \t]*=[ \t]*(?P<s>[A-Za-z0-9+/]{40,}={0,2})",
                          (b"accountkey", b"sharedaccesskey"), 0),
    "azure_sas_signature": (r"(?<=[?&;])sig=(?P<s>[A-Za-z0-9%+/=]{30,})", (b"sig=",), 0),
    # client secrets: three characters, a digit, "Q~", then 31 to 34 more
    "azure_client_secret": (r"(?<![A-Za-z0-9_~.-])(?P<s>[A-Za-z0-9_~.]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34})(?![A-Za-z0-9_~.-])",
                            (b"Q~",), 4),
    "alibaba_access_key_id": (r"\b(?P<s>LTAI[A-Za-z0-9]{12,20})\b", (b"ltai",), 0),
    "digitalocean_token": (r"\b(?P<s>do[por]_v1_[a-f0-9]{64})\b", (b"dop_v1_", b"doo_v1_", b"dor_v1_"), 0),
    "heroku_api_key": (r"\b(?P<s>HRKU-[A-Za-z0-9_-]{40,})", (b"hrku-",), 0),
    "databricks_token": (r"\b(?P<s>dapi[0-9a-f]{32}(?:-[0-9]+)?)\b", (b"dapi",), 0),
    "vault_token": (r"\b(?P<s>hv[sbr]\.[A-Za-z0-9_-]{24,})", (b"hvs.", b"hvb.", b"hvr."), 0),
    "terraform_token": (r"\b(?P<s>[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_=-]{60,})", (b".atlasv1.",), 14),
    "pulumi_token": (r"\b(?P<s>pul-[a-f0-9]{40})\b", (b"pul-",), 0),
    "doppler_token": (r"\b(?P<s>dp\.(?:pt|st|ct|sa|scim|audit)\.[A-Za-z0-9_]{40,})",
                      (b"dp.pt.", b"dp.st.", b"dp.ct.", b"dp.sa.", b"dp.scim.", b"dp.audit."), 0),
    "onepassword_token": (r"\b(?P<s>ops_eyJ[A-Za-z0-9+/]{100,}={0,3})", (b"ops_eyj",), 0),
    "planetscale_token": (r"\b(?P<s>pscale_(?:tkn|pw|oauth)_[A-Za-z0-9_.=-]{32,})", (b"pscale_tkn_", b"pscale_pw_", b"pscale_oauth_"), 0),
    "supabase_token": (r"\b(?P<s>sbp_[a-f0-9]{40})\b", (b"sbp_",), 0),
    "grafana_token": (r"\b(?P<s>glsa_[A-Za-z0-9]{32}_[0-9a-f]{8}|glc_[A-Za-z0-9+/]{32,}={0,2})", (b"glsa_", b"glc_"), 0),
    "new_relic_key": (r"\b(?P<s>NRAK-[A-Z0-9]{27})\b", (b"nrak-",), 0),
    "sentry_token": (r"\b(?P<s>sntry[su]_[A-Za-z0-9+/=_]{40,})", (b"sntrys_", b"sntryu_"), 0),
    "dynatrace_token": (r"\b(?P<s>dt0c01\.[A-Z0-9]{24}\.[A-Z0-9]{64})\b", (b"dt0c01.",), 0),
    "buildkite_token": (r"\b(?P<s>bkua_[a-f0-9]{40})\b", (b"bkua_",), 0),
    "circleci_token": (r"\b(?P<s>CCIPAT_[A-Za-z0-9]{22}_[a-f0-9]{40})\b", (b"ccipat_",), 0),
    # -- messaging and SaaS -----------------------------------------------------------------
    "slack_token": (r"\b(?P<s>(?:xox[abprse]|xoxe\.xox[bp]|xapp)-[A-Za-z0-9-]{10,})", (b"xox", b"xapp-"), 0),
    "slack_webhook": (r"hooks\.slack\.com/(?P<s>(?:services|workflows|triggers)/[A-Za-z0-9_/-]{20,})", (b"hooks.slack.com/",), 0),
    "discord_webhook": (r"discord(?:app)?\.com/api/webhooks/(?P<s>[0-9]{17,20}/[A-Za-z0-9_-]{60,})",
                        (b"discord.com/api/webhooks/", b"discordapp.com/api/webhooks/"), 0),
    "teams_webhook": (r"\.webhook\.office\.com/(?P<s>webhookb2/[A-Za-z0-9@/_-]{40,})", (b".webhook.office.com/",), 0),
    "sendgrid_key": (r"\b(?P<s>SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])", (b"SG.",), 0),
    "brevo_key": (r"\b(?P<s>xkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16})\b", (b"xkeysib-",), 0),
    "mailgun_key": (rf"\b(?P<s>(?:pub)?key-{_HEX32})\b", _after((b"key-", b"pubkey-"), _HEX_DIGITS), 0),
    "mailchimp_key": (rf"\b(?P<s>{_HEX32}-us[0-9]{{1,2}})\b", _after((b"-us",), b"0123456789"), 32),
    "twilio_api_key": (rf"\b(?P<s>SK{_HEX32})\b", _after((b"SK",), _HEX_DIGITS), 0),
    "postman_key": (r"\b(?P<s>PMAK-[0-9a-f]{24}-[0-9a-f]{34})\b", (b"pmak-",), 0),
    "linear_key": (r"\b(?P<s>lin_api_[A-Za-z0-9]{40})\b", (b"lin_api_",), 0),
    "atlassian_token": (r"\b(?P<s>ATATT3[A-Za-z0-9_=-]{180,})", (b"atatt3",), 0),
    "contentful_token": (r"\b(?P<s>CFPAT-[A-Za-z0-9_-]{43})", (b"cfpat-",), 0),
    "shopify_token": (r"\b(?P<s>shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32})\b", (b"shpat_", b"shpca_", b"shppa_", b"shpss_"), 0),
    "square_token": (r"\b(?P<s>sq0(?:atp|csp)-[A-Za-z0-9_-]{22,})", (b"sq0atp-", b"sq0csp-"), 0),
    "stripe_key": (r"\b(?P<s>(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}|whsec_[A-Za-z0-9]{24,})", (b"_live_", b"_test_", b"whsec_"), None),
    "easypost_key": (r"\b(?P<s>EZ[AT]K[A-Za-z0-9]{54})\b", (b"ezak", b"eztk"), 0),
    "mapbox_secret_token": (r"\b(?P<s>sk\.eyJ[A-Za-z0-9_-]{50,}\.[A-Za-z0-9_-]{20,})", (b"sk.eyj",), 0),
    "age_secret_key": (r"\b(?P<s>AGE-SECRET-KEY-1[0-9A-Z]{58})\b", (b"age-secret-key-1",), 0),
    # -- AI providers -----------------------------------------------------------------------
    "openai_key": (r"\b(?P<s>sk-(?!ant-)(?:proj-)?[A-Za-z0-9_-]{20,})", (b"sk-",), 0),
    "anthropic_key": (r"\b(?P<s>sk-ant-[a-z0-9]+-[A-Za-z0-9_-]{40,})", (b"sk-ant-",), 0),
    "huggingface_token": (r"\b(?P<s>(?:hf|api_org)_[A-Za-z]{34})(?![A-Za-z0-9])", (b"hf_", b"api_org_"), 0),
    "groq_key": (r"\b(?P<s>gsk_[A-Za-z0-9]{52})\b", (b"gsk_",), 0),
    "replicate_token": (r"\b(?P<s>r8_[A-Za-z0-9]{37})\b", (b"r8_",), 0),
    "perplexity_key": (r"\b(?P<s>pplx-[A-Za-z0-9]{48})\b", (b"pplx-",), 0),
    "langsmith_key": (r"\b(?P<s>lsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10})\b", (b"lsv2_pt_", b"lsv2_sk_"), 0),
}
DETECTORS: dict[str, str] = {name: rx for name, (rx, _, _) in _FAMILIES.items()}
# Cheap literal triggers: a detector whose triggers are all absent from a chunk is not run on
# it. Measured: the regexes alone ran at 3 MB/s over log text; with triggers, clean logs pass
# at the speed of a few substring searches.
TRIGGERS: dict[str, tuple[bytes, ...]] = {name: trig for name, (_, trig, _) in _FAMILIES.items()}
# Detectors whose match starts at (or a fixed distance before) a trigger word: they are tried
# only there, with an anchored match (one attempt per occurrence instead of a line scan).
ANCHORED = frozenset(name for name, (_, _, at) in _FAMILIES.items() if at is not None)
ANCHOR_BACK: dict[str, int] = {name: at for name, (_, _, at) in _FAMILIES.items() if at}
PRIVATE_KEY_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")
PRIVATE_KEY_END = re.compile(rb"-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")

# Keys of metadata tables whose values are masked whatever they hold.
SECRET_KEY_RE = re.compile(
    r"(?i)(?:^|[^a-z])(tokens?|password|passwd|passphrase|secrets?|credentials?|api[_-]?key|apikey|private[_-]?key"
    r"|access[_-]?key|auth|authorization|cookie|session[_-]?id)(?:$|[^a-z])"
)
MASK = "[REDACTED]"


def split_secrets(secrets: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``{name: value}`` into (used, ignored-with-reason)."""
    used: dict[str, str] = {}
    ignored: dict[str, str] = {}
    for name, value in secrets.items():
        if value is None or len(value.strip()) < MIN_SECRET_LEN:
            ignored[name] = f"shorter than {MIN_SECRET_LEN} characters"
        elif value.strip().lower() in COMMON_VALUES:
            ignored[name] = "a common value"
        else:
            used[name] = value
    return used, ignored


def _b64_forms(raw: bytes) -> list[bytes]:
    """The base64 text of ``raw`` when it sits at each byte alignment inside longer data."""
    forms = []
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + raw)
        start = -(-k * 8 // 6)  # first character made only of secret bits
        end = (k + len(raw)) * 8 // 6  # last character made only of secret bits
        piece = enc[start:end]
        if len(piece) >= MIN_SECRET_LEN:
            forms.append(piece)
            forms.append(piece.translate(bytes.maketrans(b"+/", b"-_")))
    return forms


def variants(value: str, *, wide: bool = False) -> list[bytes]:
    """Every byte form of ``value`` that stage 1 masks; ``wide`` adds UTF-16 (LE and BE), the
    form Windows programs, Java and .NET write strings in, for binary files."""
    out: list[bytes] = []
    texts = [value]
    if "\n" in value:
        texts += [line.strip() for line in value.splitlines() if len(line.strip()) >= MIN_SECRET_LEN]
    if value.strip() != value:
        texts.append(value.strip())  # printed without its surrounding blanks
    for text in texts:
        raw = text.encode("utf-8", "surrogateescape")
        out.append(raw)
        out.extend(_b64_forms(raw))
        for form in (quote(text, safe=""), quote_plus(text, safe=""), json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], shlex.quote(text), text.replace("'", "'\\''")):
            out.append(form.encode("utf-8", "surrogateescape"))
        if wide:
            out.append(text.encode("utf-16-le", "surrogatepass"))
            out.append(text.encode("utf-16-be", "surrogatepass"))
    seen: set[bytes] = set()
    return [v for v in out if len(v) >= MIN_SECRET_LEN and not (v in seen or seen.add(v))]


# Masks already in a text: a detector match made only of them (and blanks, or the \n escapes
# of a JSON string holding a masked key) is not a new secret.
_MASKS_ONLY = re.compile(rb"(?:\[REDACTED(?::[^\]\s]{1,128})?\])+")
_BLANKS = re.compile(rb"(?:\s|\\[nrt])+")


def _secret_span(m: re.Match) -> tuple[int, int]:
    """The span a detector masks: its group ``s``, else the whole match."""
    try:
        return m.span("s")
    except IndexError:
        return m.span()


def is_masked(data: bytes) -> bool:
    """True if ``data`` is nothing but masks (``[REDACTED:x]``, ``[REDACTED]``)."""
    return _MASKS_ONLY.fullmatch(_BLANKS.sub(b"", data)) is not None


# Bytes that do not occur in text: C0 controls other than \t \n \v \f \r and ESC, and DEL.
_CONTROL = bytes([*range(0, 9), *range(14, 27), *range(28, 32), 127])
BINARY_SNIFF = 8192


def looks_binary(head: bytes) -> bool:
    """Classify a file by its first :data:`BINARY_SNIFF` bytes.

    Binary if more than 1/32 of them are control bytes (random or compressed data has about
    a tenth), or if there is a NUL and the bytes are not UTF-8. A log with a stray NUL
    stays text (and so passes the detectors); either way the artifact policy applies.
    """
    if not head:
        return False
    controls = len(head) - len(head.translate(None, _CONTROL))
    if controls * 32 > len(head):
        return True
    if b"\0" in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start < len(head) - 3  # a character cut at the end of the sample is fine
    return False


@functools.lru_cache(maxsize=16)
def _value_table(values: tuple[tuple[str, str], ...], wide: bool):
    """(forms, names, automaton, holdback) for a set of values; shared by every stream."""
    patterns: dict[bytes, str] = {}
    for name, value in values:
        for form in variants(value, wide=wide):
            patterns.setdefault(form, name)
    forms = list(patterns)
    ac = None
    if forms:
        import ahocorasick_rs

        ac = ahocorasick_rs.BytesAhoCorasick(forms, matchkind=ahocorasick_rs.MATCHKIND_LEFTMOST_LONGEST)
    return forms, [patterns[f] for f in forms], ac, max((len(p) for p in forms), default=1) - 1


class _ValueStage:
    """Literal forms of declared values, found with one Aho-Corasick pass (leftmost-longest).

    ``same_length`` masks each match with as many ``*`` as it has bytes, for binary files
    whose layout must not move; ``wide`` adds the UTF-16 forms.
    """

    def __init__(self, values: Mapping[str, str], *, same_length: bool = False, wide: bool = False) -> None:
        self._forms, self._names, self._ac, self._hold = _value_table(tuple(sorted(values.items())), wide)
        self._same_length = same_length
        self.hits: dict[str, int] = {}
        self._buf = b""
        self.count = 0

    def _replace(self, buf: bytes, limit: int | None) -> tuple[list[bytes], int]:
        """Replace matches that start before ``limit``; returns (pieces, end of last match)."""
        out: list[bytes] = []
        pos = 0
        for idx, start, end in self._ac.find_matches_as_indexes(buf):
            if limit is not None and start >= limit:
                break
            name = self._names[idx]
            out.append(buf[pos:start])
            out.append(b"*" * (end - start) if self._same_length else f"[REDACTED:{name}]".encode())
            self.count += 1
            self.hits[name] = self.hits.get(name, 0) + 1
            pos = end
        return out, pos

    def feed(self, chunk: bytes) -> bytes:
        if self._ac is None:
            return chunk
        buf = self._buf + chunk
        safe_end = len(buf) - self._hold
        if safe_end <= 0:
            self._buf = buf
            return b""
        # A match starting before safe_end is complete: the longest form fits in the buffer.
        out, pos = self._replace(buf, safe_end)
        emit_end = max(pos, safe_end)
        out.append(buf[pos:emit_end])
        self._buf = buf[emit_end:]
        return b"".join(out)

    def close(self) -> bytes:
        if self._ac is None:
            return b""
        buf, self._buf = self._buf, b""
        out, pos = self._replace(buf, None)
        out.append(buf[pos:])
        return b"".join(out)


@functools.lru_cache(maxsize=16)
def _pattern_table(patterns: tuple[tuple[str, str | bytes], ...]):
    """Compiled rules and trigger automata for a set of patterns; shared by every stream.

    Returns (rules, words, lower automaton, case automaton, anchored rules by word, words of
    the line-wise rules, number of case-sensitive words, line-wise rules). ``words`` lists the
    lower-case words first, then the case-sensitive ones, so one index space covers hits from
    both automata.
    """
    import ahocorasick_rs

    rules = [
        (name, re.compile(rx.encode() if isinstance(rx, str) else rx), TRIGGERS.get(name) if rx == DETECTORS.get(name) else None)
        for name, rx in patterns
    ]
    all_words = {t for _, _, trig in rules if trig for t in trig}
    lower = sorted(w for w in all_words if w == w.lower())
    case = sorted(all_words - set(lower))
    by_word: dict[bytes, list[tuple[str, re.Pattern, int]]] = {}
    linewise: set[bytes] = set()
    for name, rx, trig in rules:
        for w in trig or ():
            if name in ANCHORED:
                by_word.setdefault(w, []).append((name, rx, ANCHOR_BACK.get(name, 0)))
            else:
                linewise.add(w)
    # A DFA: with ~150 words the default automaton scanned at 170-250 MB/s, the DFA at 500.
    dfa = ahocorasick_rs.Implementation.DFA
    return (
        rules,
        lower + case,
        ahocorasick_rs.BytesAhoCorasick(lower, implementation=dfa) if lower else None,
        ahocorasick_rs.BytesAhoCorasick(case, implementation=dfa) if case else None,
        by_word,
        frozenset(linewise),
        len(case),
        [(name, rx, frozenset(trig)) for name, rx, trig in rules if trig and name not in ANCHORED],
    )


class _PatternStage:
    """Regex detectors over complete lines; private key blocks masked line by line."""

    def __init__(self, patterns: Mapping[str, str]) -> None:
        (self._rules, self._trigger_words, self._triggers, self._case_triggers,
         self._by_word, self._linewise_words, self._n_case, self._linewise_rules) = _pattern_table(tuple(patterns.items()))
        self._by_index = [self._by_word.get(w, ()) for w in self._trigger_words]
        self._buf = b""
        self._in_key = False
        self.count = 0
        self.hits: dict[str, int] = {}
        self.active = bool(self._rules)
        self._linewise = bool(self._linewise_words)

    def _find_triggers(self, text: bytes) -> list:
        """(word index, start, end) of every trigger word in ``text``: one automaton pass over
        the lower-cased text, and one over the text itself for case-sensitive words."""
        hits = self._triggers.find_matches_as_indexes(text.lower(), overlapping=True) if self._triggers is not None else []
        if self._case_triggers is not None:
            n = len(self._trigger_words) - self._n_case
            hits += [(i + n, a, b) for i, a, b in self._case_triggers.find_matches_as_indexes(text, overlapping=True)]
        return hits

    def _block(self, block: bytes) -> bytes:
        """Redact a block of complete lines (or a final partial line)."""
        if self._in_key or b"PRIVATE KEY" in block:
            return b"".join(self._key_line(line) for line in block.splitlines(keepends=True))
        return self._rules_on(block)

    def _rules_on(self, text: bytes) -> bytes:
        """Run the rules over a block of complete lines.

        Rules without triggers (plugin and config patterns) scan the block. Detectors run
        only where one automaton pass over the lower-cased block found a trigger word:
        anchored ones as one ``match`` at each occurrence, the others on the lines holding
        one (scanning whole blocks ran at 12 MB/s on 500 MB of ordinary logs).
        """
        for name, rx, triggers in self._rules:
            if triggers is None:  # one line at a time, so ^ and $ mean what the author meant
                text = b"".join(self._sub(name, rx, line) for line in text.splitlines(keepends=True))
        if not self._trigger_words:
            return text
        hits = self._find_triggers(text)
        if not hits:
            return text
        text, changed = self._anchored(text, hits)
        if self._linewise:
            if changed:  # offsets moved: find the triggers again
                hits = self._find_triggers(text)
            text = self._rules_on_lines(text, hits)
        return text

    def _anchored(self, text: bytes, hits) -> tuple[bytes, bool]:
        by_index = self._by_index
        spans: list[tuple[int, int, str]] = []
        for i, start, _ in hits:
            for name, rx, back in by_index[i]:
                if start < back:
                    continue
                m = rx.match(text, start - back)
                if m is None:
                    continue
                a, b = _secret_span(m)
                if a >= 0 and b > a and not is_masked(text[a:b]):
                    spans.append((a, b, name))
        if not spans:
            return text, False
        # merge overlapping matches (longest first at equal starts): the mask covers them all
        spans.sort(key=lambda t: (t[0], -t[1]))
        merged: list[list] = []
        for a, b, name in spans:
            if merged and a < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b, name])
        out, pos = [], 0
        for a, b, name in merged:
            out.append(text[pos:a])
            out.append(f"[REDACTED:{name}]".encode())
            self.count += 1
            self.hits[name] = self.hits.get(name, 0) + 1
            pos = b
        out.append(text[pos:])
        return b"".join(out), True

    def _rules_on_lines(self, text: bytes, hits) -> bytes:
        """Line-wise detectors (those whose trigger sits inside the match) on trigger lines."""
        words = self._trigger_words
        lines: dict[int, tuple[int, set[bytes]]] = {}  # line start -> (line end, words seen)
        for i, start, _ in hits:
            if words[i] not in self._linewise_words:
                continue
            ls = text.rfind(b"\n", 0, start) + 1
            entry = lines.get(ls)
            if entry is None:
                le = text.find(b"\n", start)
                entry = lines[ls] = (len(text) if le < 0 else le, set())
            entry[1].add(words[i])
        if not lines:
            return text
        out = []
        pos = 0
        for ls in sorted(lines):
            le, seen = lines[ls]
            line = text[ls:le]
            for name, rx, triggers in self._linewise_rules:
                if not seen.isdisjoint(triggers):
                    line = self._sub(name, rx, line)
            out.append(text[pos:ls])
            out.append(line)
            pos = le
        out.append(text[pos:])
        return b"".join(out)

    def _key_line(self, line: bytes) -> bytes:
        body = line.rstrip(b"\r\n")
        end = line[len(body) :]
        if self._in_key:
            close = PRIVATE_KEY_END.search(body)
            if close:
                self._in_key = False
                # key material before the END marker is masked; text after it is scanned
                head = b"[REDACTED:private_key]" if body[: close.start()].strip() else b""
                return head + body[close.start() : close.end()] + self._rules_on(body[close.end() :]) + end
            if not body.strip() or is_masked(body):  # a blank line, or one masked before
                return line
            self._key_hit()
            return b"[REDACTED:private_key]" + end
        begin = PRIVATE_KEY_BEGIN.search(body)
        if begin:
            close = PRIVATE_KEY_END.search(body, begin.end())
            if close is None:
                self._in_key = True
                tail = b"[REDACTED:private_key]" if body[begin.end() :].strip() else b""
                return self._rules_on(body[: begin.start()]) + body[begin.start() : begin.end()] + tail + end
            inner = body[begin.end() : close.start()]
            if inner and not is_masked(inner):  # a whole key on one line (JSON with \n escapes)
                self._key_hit()
                line = body[: begin.end()] + b"[REDACTED:private_key]" + body[close.start() :] + end
        return self._rules_on(line)

    def _key_hit(self) -> None:
        self.count += 1
        self.hits["private_key"] = self.hits.get("private_key", 0) + 1

    def _sub(self, name: str, rx: re.Pattern, text: bytes) -> bytes:
        out = []
        pos = 0
        for m in rx.finditer(text):
            start, end = _secret_span(m)
            if start < 0 or end <= start or is_masked(text[start:end]):
                continue
            out.append(text[pos:start])
            out.append(f"[REDACTED:{name}]".encode())
            self.count += 1
            self.hits[name] = self.hits.get(name, 0) + 1
            pos = end
        if not out:
            return text
        out.append(text[pos:])
        return b"".join(out)

    def feed(self, data: bytes) -> bytes:
        if not self.active:
            return data
        buf = self._buf + data
        cut = buf.rfind(b"\n") + 1
        if cut == 0 and len(buf) <= MAX_LINE:
            self._buf = buf
            return b""
        if cut == 0:  # a line with no end in sight is processed in pieces
            cut = len(buf)
        self._buf = buf[cut:]
        return self._block(buf[:cut])

    def close(self) -> bytes:
        if not self.active:
            return b""
        buf, self._buf = self._buf, b""
        return self._block(buf) if buf else b""


class StreamRedactor:
    """Redacts a byte stream chunk by chunk. Call :meth:`feed` per chunk, :meth:`close` at EOF."""

    def __init__(self, values: Mapping[str, str], patterns: Mapping[str, str] | None = None, *, binary: bool = False) -> None:
        # binary: declared values only, in UTF-16 too, each masked by as many "*" as it has bytes
        self._values = _ValueStage(values, same_length=binary, wide=binary)
        self._patterns = _PatternStage({} if binary else patterns or {})

    @property
    def count(self) -> int:
        return self._values.count + self._patterns.count

    @property
    def idle(self) -> bool:
        """True when nothing is held back (everything fed so far has been emitted)."""
        return not self._values._buf and not self._patterns._buf

    @property
    def hits(self) -> dict[str, int]:
        """Matches per secret or detector name."""
        out = dict(self._values.hits)
        for k, v in self._patterns.hits.items():
            out[k] = out.get(k, 0) + v
        return out

    def feed(self, chunk: bytes) -> bytes:
        return self._patterns.feed(self._values.feed(chunk))

    def close(self) -> bytes:
        return self._patterns.feed(self._values.close()) + self._patterns.close()


def policy(config: Mapping | None, values: Mapping[str, str] | None = None, patterns: Mapping[str, str] | None = None) -> "Redactor":
    """The one place a run's redactor is assembled (the CLI, the supervisor and its fallbacks):
    ``values`` (declared and plugin-contributed secrets), the built-in detectors, the config's
    ``[redaction.patterns]`` and plugin ``patterns``, minus what ``[redaction.detectors]``
    switches off. ``config`` is the config's ``[redaction]`` table (or None)."""
    config = config or {}
    switches = config.get("detectors") or {}
    merged = {**DETECTORS, **(config.get("patterns") or {}), **(patterns or {})}
    return Redactor(values or {}, {k: v for k, v in merged.items() if switches.get(k, True)})


class Redactor:
    """The secrets of one run, applied to streams, strings and metadata."""

    def __init__(self, values: Mapping[str, str] | None = None, patterns: Mapping[str, str] | None = None) -> None:
        self.values = dict(values or {})
        self.patterns = dict(patterns or {})

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self.values, self.patterns)

    def binary_stream(self) -> StreamRedactor:
        """For binary files: declared values (also UTF-16) masked byte for byte, no detectors."""
        return StreamRedactor(self.values, binary=True)

    def text(self, text: str) -> str:
        r = self.stream()
        raw = text.encode("utf-8", "surrogateescape")
        return (r.feed(raw) + r.close()).decode("utf-8", "replace")

    def bytes(self, data: bytes) -> tuple[bytes, int]:
        r = self.stream()
        out = r.feed(data) + r.close()
        return out, r.count

    def metadata(self, value, key: str | None = None):
        """Redact a JSON-like value: strings scanned, keys too (``--label "$TOKEN=v"``), and
        values under secret-naming keys masked, unless they are masks already."""
        if key is not None and SECRET_KEY_RE.search(key) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value if isinstance(value, str) and is_masked(value.encode()) else MASK
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {(self.text(k) if isinstance(k, str) else k): self.metadata(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.metadata(v) for v in value]
        return value


def redact_text(text: str, secrets: Mapping[str, str], patterns: Mapping[str, str] | None = None) -> str:
    """Redact a whole string (error messages, argv, labels)."""
    return Redactor(secrets, patterns).text(text)
