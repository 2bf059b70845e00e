"""PII redaction as BigCode redacted The Stack for StarCoder: emails, IP addresses, secrets, and author names.

- Emails and IPv4/IPv6 addresses by regular expression. An IP must parse and must not look like a version (a short
  dotted quad with no "dns" or "server" nearby, or one right after "version", "v" or a version comparison); private,
  reserved, multicast, documentation and loopback addresses and the popular public DNS servers are kept.
- Secrets by detect-secrets' plugins (AWS, GitHub, GitLab, Slack, Stripe, JWT, npm, PyPI, SendGrid, Twilio, ... and
  the base64 / hex high-entropy strings), with detect-secrets' own UUID / id / template / sequence filters, then
  BigCode's two checks: a high-entropy string must be gibberish (a character-bigram model of English, see
  recipes/pii/build_gibberish.py), and a hash-shaped value is no secret where its line or its file speaks of hashes.
  A long random value assigned to a name that says secret, token or key is a key too (detect-secrets only sees
  quoted strings; .env and INI files do not quote). Values that announce themselves as examples, tests or
  placeholders (AWS's documented AKIA...EXAMPLE, sk_test_, "xxxx", "changeme") are kept.
- Passwords: password-like assignments and credentials in URLs (`scheme://user:password@host`).
- Names: without a named-entity model, only where code says who someone is: author / maintainer fields,
  "Author:", "@author", "Created by", a copyright line with an address, and a name field next to an email field.

Replacements: `<EMAIL>`, `<KEY>`, `<PASSWORD>`, `<NAME>`; an IP becomes one of five fixed private addresses of its
family, chosen by a hash of the address, so the same value always gets the same replacement (in every worker).
Where findings overlap, secrets win over emails and names (`https://TOKEN@github.com` is a key, not an address).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

KINDS = ("EMAIL", "IP_ADDRESS", "KEY", "PASSWORD", "NAME")
_PRIORITY = {"KEY": 0, "PASSWORD": 1, "EMAIL": 2, "IP_ADDRESS": 3, "NAME": 4}
GIBBERISH_MODEL = Path(__file__).parents[1] / "assets" / "gibberish.model"
GIBBERISH_LIMIT = 4.0  # gibberish-detector's default, as BigCode used it

REPLACEMENT_IPS = {
    4: ["172.16.31.10", "172.16.58.3", "172.16.17.32", "192.168.127.12", "192.168.3.11"],
    6: ["fd00:c2b6:b24b:be67:2827:688d:e6a1:6a3b", "fd00:a516:7c1b:17cd:6d81:2137:bd2a:2c5b",
        "fc00:e968:6179::de52:7100", "fc00:db20:35b:7399::5", "fdf8:f53e:61e4::18"],
}
POPULAR_DNS = frozenset({
    "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112", "208.67.222.222", "208.67.220.220",
    "76.76.19.19", "76.223.122.150", "94.140.14.14", "94.140.15.15", "8.26.56.26", "8.20.247.20", "64.6.64.6",
    "64.6.65.6", "185.228.168.9", "185.228.169.9", "2001:4860:4860::8888", "2001:4860:4860::8844",
    "2606:4700:4700::1111", "2606:4700:4700::1001", "2620:fe::fe", "2620:fe::9",
})


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    value: str
    detector: str = "regex"  # or "model" (a StarPII-format model, see pii_model.py)


# ---- emails ----------------------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+\-@])"  # not inside a longer word or address
    r"([A-Za-z0-9][A-Za-z0-9._%+\-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))"
    r"(?![\w\-@]|\.[A-Za-z0-9])")
# Generic top-level domains seen in real addresses; every two-letter country code is accepted too. Without this,
# `inputs@self.weight` (Python's matrix product) would be an address.
_GENERIC_TLD_WORDS = (
    "com org net edu gov mil int info biz io ai dev app co me tech xyz online site name pro mobi cloud email mail "
    "club page blog systems software solutions company network digital science academy center global group today "
    "works agency studio design media news live life world space website host tools team codes social cafe")
_GENERIC_TLDS = frozenset(_GENERIC_TLD_WORDS.split())
# Addresses that are not anyone's: documentation domains (RFC 2606) and service accounts.
_NOT_PERSONAL_DOMAIN = re.compile(r"(^|\.)(example\.(com|org|net)|localhost|test|invalid|domain\.com|email\.com|"
                                  r"users\.noreply\.github\.com)$", re.IGNORECASE)
_NOT_PERSONAL_USER = re.compile(r"^(git|noreply|no-reply|donotreply|user|username|someone|you|your\.?name|"
                                r"name|foo|bar|me|email)$", re.IGNORECASE)


def find_emails(text: str) -> list[Finding]:
    found = []
    for match in _EMAIL.finditer(text):
        address, tld = match.group(1), match.group(2).lower()
        user, domain = address.rsplit("@", 1)
        if len(tld) != 2 and tld not in _GENERIC_TLDS:
            continue
        if _NOT_PERSONAL_DOMAIN.search(domain) or _NOT_PERSONAL_USER.match(user):
            continue
        found.append(Finding("EMAIL", match.start(1), match.end(1), address))
    return found


# ---- IP addresses ----------------------------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])((?:\d{1,3}\.){3}\d{1,3})(?!\w|\.\w)")
_IPV6 = re.compile(r"(?<![\w:.])((?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3}))(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?:(?<![A-Za-z])(?:version|ver|release|v)[\s=:\"'_-]*|(?:[<>~^]=?|==)\s*)$",
                             re.IGNORECASE)


def _looks_like_version(address: str, before: str, around: str) -> bool:
    """BigCode's rule: a short dotted quad (at most 8 characters, like 1.2.3.4 or 2.10.0.1) is a version unless
    DNS or servers are being talked about; and anything right after "version", "v" or ">=" is one."""
    if _VERSION_BEFORE.search(before):
        return True
    return len(address) <= 8 and not re.search(r"dns|server", around, re.IGNORECASE)


def find_ips(text: str) -> list[Finding]:
    found = []
    for pattern in (_IPV4, _IPV6):
        for match in pattern.finditer(text):
            value = match.group(1)
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                continue
            if not address.is_global or address.is_multicast or value in POPULAR_DNS or str(address) in POPULAR_DNS:
                continue  # private, loopback, link-local, reserved, documentation, multicast, or a public resolver
            if address.version == 6 and value.count(":") < 3:
                continue  # "a::b"-like tokens of code, not addresses people write
            start, end = match.start(1), match.end(1)
            if address.version == 4 and _looks_like_version(value, text[max(0, start - 12):start],
                                                             text[max(0, start - 100):end + 100]):
                continue
            found.append(Finding("IP_ADDRESS", start, end, value))
    return found


# ---- secrets ---------------------------------------------------------------------------------------------------

# detect-secrets plugins (BigCode's list plus the newer token formats). Its keyword and basic-auth plugins are
# replaced by the password and secret-assignment rules below, which also see unquoted values.
_KEY_PLUGINS = (
    "artifactory.ArtifactoryDetector", "aws.AWSKeyDetector", "azure_storage_key.AzureStorageKeyDetector",
    "cloudant.CloudantDetector", "discord.DiscordBotTokenDetector", "github_token.GitHubTokenDetector",
    "gitlab_token.GitLabTokenDetector", "ibm_cloud_iam.IbmCloudIamDetector", "ibm_cos_hmac.IbmCosHmacDetector",
    "jwt.JwtTokenDetector", "mailchimp.MailchimpDetector", "npm.NpmDetector", "openai.OpenAIDetector",
    "pypi_token.PypiTokenDetector", "sendgrid.SendGridDetector", "slack.SlackDetector",
    "softlayer.SoftlayerDetector", "square_oauth.SquareOAuthDetector", "stripe.StripeDetector",
    "telegram_token.TelegramBotTokenDetector", "twilio.TwilioKeyDetector",
)
_ENTROPY_PLUGINS = ("high_entropy_strings.Base64HighEntropyString", "high_entropy_strings.HexHighEntropyString")
# Token formats detect-secrets does not know yet.
_EXTRA_KEYS = re.compile(r"\bgithub_pat_[A-Za-z0-9_]{60,}|\bAIza[0-9A-Za-z_\-]{35}\b")
_PLACEHOLDER = re.compile(r"example|sample|dummy|placeholder|changeme|change_me|your[_-]|xxxx|\*\*\*|<|>|\$\{|"
                          r"\{\{|%\(|redacted|fake|0000000|1234567|abcdef|_test_|test_key|testkey", re.IGNORECASE)
_HASH_WORDS = ("sha", "hash", "md5", "checksum", "digest", "integrity", "commit", "revision", "fingerprint",
               "etag", "crc", "oid", "blob", "object")
# Hex digests (md5, sha1, sha256, sha512) and the base64 lengths of the same digests.
_HASH_SHAPED = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64}|[0-9a-fA-F]{128}|"
                          r"[A-Za-z0-9+/]{22}(==)?|[A-Za-z0-9+/]{27}=|[A-Za-z0-9+/]{43}=|[A-Za-z0-9+/]{86}==|"
                          r"(sha\d*|md5)[-:].*")
# A value assigned to a name that says it is secret: quoted (any characters) or bare (.env, INI, YAML).
_SECRET_ASSIGNMENT = re.compile(
    r"""(?i)(?:secret|token|key|credential)[\w.\-]*["']?\]?\s*(?::=|=>|[:=])\s*"""
    r"""(?:(["'])([^\s"']{16,256})\1|([A-Za-z0-9+/=_\-.]{16,256})(?=\s*$))""", re.MULTILINE)
# A password assignment: a password-like name, an assignment, then a quoted value (or an unquoted one in
# config files), as people write them in code, YAML, .env and INI files.
_PASSWORD = re.compile(
    r"""(?i)(?:passw(?:or)?d|pwd|passphrase)[\w.\-]*["']?\s*(?::=|=>|[:=])\s*"""
    r"""(?:(["'])([^\s"']{4,128})\1|([^\s"'#;,]{6,128})(?=\s*(?:$|[#;,])))""", re.MULTILINE)
# Not passwords: labels ("password", "new_pass:"), calls, CONSTANT_NAMES, attribute paths, null-ish words.
_NOT_A_PASSWORD = re.compile(r"(?i:^[a-z_ ]*(?:pass|pwd)[a-z_ :]*$)|^[\w.]+[(\[]|^[A-Z_][A-Z0-9_.]*$|^\w+\.\w+\.?|"
                             r"(?i:^(?:none|null|nil|true|false|undefined)$)")
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s/:@'\"]*:([^\s/@'\"]{3,})@[\w.\-]+", re.IGNORECASE)
_PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----\s*\n(.*?)\n\s*-----END \1-----",
                          re.DOTALL)
_VALUE_END = re.compile(r"[\s\"'`,;]")


@cache
def _plugins(names: tuple[str, ...]) -> list:
    import importlib

    plugins = []
    for name in names:
        module, cls = name.rsplit(".", 1)
        plugin_class = getattr(importlib.import_module(f"detect_secrets.plugins.{module}"), cls)
        if module == "high_entropy_strings":  # detect-secrets' default limits
            plugins.append(plugin_class(limit=4.5 if cls.startswith("Base64") else 3.0))
        else:
            plugins.append(plugin_class())
    return plugins


@cache
def _gibberish_detector():
    from gibberish_detector import detector

    return detector.create_from_model(str(GIBBERISH_MODEL), GIBBERISH_LIMIT)


def is_gibberish(value: str) -> bool:
    return _gibberish_detector().is_gibberish(value.lower())


def _is_detect_secrets_false_positive(value: str, line: str, plugin) -> bool:
    from detect_secrets.filters import heuristic

    return (heuristic.is_potential_uuid(value) or heuristic.is_sequential_string(value)
            or heuristic.is_templated_secret(value) or heuristic.is_likely_id_string(value, line, plugin))


@lru_cache(maxsize=4)  # asked once per candidate secret of the same text (str caches its own hash)
def file_has_hashes(text: str, share: float = 0.02) -> bool:
    """BigCode's file-level check: "sha" or "hash" on more than 2% of the lines."""
    lowered = text.lower()
    return lowered.count("sha") + lowered.count("hash") > int(share * text.count("\n"))


def _is_hash(value: str, line: str, text: str) -> bool:
    """A hash-shaped value where the line, or the file as a whole, speaks of hashes (any hex value, in a file full
    of hashes)."""
    if re.fullmatch(r"[0-9a-fA-F]+", value) and file_has_hashes(text):
        return True
    if not _HASH_SHAPED.fullmatch(value):
        return False
    lowered = line.lower()
    return any(word in lowered for word in _HASH_WORDS) or file_has_hashes(text)


_CONFIG_SUFFIXES = frozenset({".env", ".ini", ".cfg", ".conf", ".properties", ".yaml", ".yml", ".toml", ".sh",
                              ".bash", ".zsh", ".txt", ".md", ".rst", ".npmrc", ".pypirc", ".netrc", ".json"})


def _is_config_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return name.startswith(".env") or name in ("dockerfile", "docker-compose.yml") or any(
        name.endswith(suffix) for suffix in _CONFIG_SUFFIXES)


def _is_random(value: str) -> bool:
    """Long enough and random enough to be a key rather than a word, a path or a name."""
    if len(value) < 16 or _PLACEHOLDER.search(value):
        return False
    if re.fullmatch(r"[0-9a-fA-F]+", value):  # hex: long, varied, and not a decimal number
        return len(value) >= 32 and len(set(value)) >= 10 and not value.isdigit()
    return is_gibberish(value)


def find_secrets(text: str, path: str | None = None) -> list[Finding]:
    """Keys (`KEY`) and passwords (`PASSWORD`), with their positions in text. path, when known, tells config
    files (where `password = hunter2` is a literal) from code (where it is an expression)."""
    found: list[Finding] = []

    def add(kind: str, match: re.Match, group: int) -> None:
        found.append(Finding(kind, match.start(group), match.end(group), match.group(group)))

    for match in _PRIVATE_KEY.finditer(text):
        add("KEY", match, 2)
    for match in _URL_PASSWORD.finditer(text) if "://" in text and "@" in text else ():
        if not _PLACEHOLDER.search(match.group(1)):
            add("PASSWORD", match, 1)
    unquoted_literals = path is None or _is_config_file(path)
    for match in _PASSWORD.finditer(text):
        group = 2 if match.group(2) is not None else 3
        if group == 3 and not unquoted_literals:
            continue
        if not _PLACEHOLDER.search(match.group(group)) and not _NOT_A_PASSWORD.search(match.group(group)):
            add("PASSWORD", match, group)
    for match in _SECRET_ASSIGNMENT.finditer(text):
        group = 2 if match.group(2) is not None else 3
        if _is_random(match.group(group)) and not _is_hash(match.group(group), _line_at(text, match.start()), text):
            add("KEY", match, group)
    for match in _EXTRA_KEYS.finditer(text) if "github_pat_" in text or "AIza" in text else ():
        if not _PLACEHOLDER.search(match.group(0)):
            add("KEY", match, 0)
    for start, end, value in _detect_secrets_plugins(text):
        line = _line_at(text, start)
        if len(line) < 2000 and not _is_hash(value, line, text):
            found.append(Finding("KEY", start, end, value))
    return found


def _line_at(text: str, position: int) -> str:
    end = text.find("\n", position)
    return text[text.rfind("\n", 0, position) + 1 : end if end >= 0 else len(text)]


# The plugins that look for a keyword assignment (cloudant_key = ..., ibm_iam_api_key: ...) try their pattern at
# every position, which makes them the slowest by far; every secret they find is a run of 24 or more
# [A-Za-z0-9_-], so they only look at the lines that have one.
_KEYWORD_PLUGINS = ("CloudantDetector", "IbmCloudIamDetector", "IbmCosHmacDetector", "SoftlayerDetector")
_LONG_RUN = re.compile(r"[A-Za-z0-9_\-]{24,}")


@cache
def _plugin_patterns() -> list[tuple[re.Pattern, object, bool]]:
    """(regex, plugin, is a keyword plugin) for every regex of the key plugins. They run over a whole text at once
    rather than line by line, so `^` and `$` are made to mean the start and end of a line, as they do when
    detect-secrets scans line by line."""
    return [(re.compile(pattern.pattern, pattern.flags | re.MULTILINE), plugin,
             type(plugin).__name__ in _KEYWORD_PLUGINS)
            for plugin in _plugins(_KEY_PLUGINS) for pattern in plugin.denylist]


def _plugin_matches(text: str):
    """(match, plugin, offset of the string matched in text) for every regex of the key plugins."""
    keyword_patterns = []
    for pattern, plugin, keyword in _plugin_patterns():
        if keyword:
            keyword_patterns.append((pattern, plugin))
        else:
            for match in pattern.finditer(text):
                yield match, plugin, 0
    line_starts = sorted({text.rfind("\n", 0, m.start()) + 1 for m in _LONG_RUN.finditer(text)})
    for start in line_starts:
        line = _line_at(text, start)
        for pattern, plugin in keyword_patterns:
            for match in pattern.finditer(line):
                yield match, plugin, start


def _detect_secrets_plugins(text: str):
    """(start, end, value) of what detect-secrets' plugins find, less their own false-positive filters, values
    that are placeholders, and high-entropy strings that are not gibberish."""
    for match, plugin, offset in _plugin_matches(text):
        # the secret is the longest group, or the whole match when the groups are only a prefix (GitHub's
        # `(ghp|gho|...)_...`); cut at the first space or quote (npm's pattern runs to the end of the line)
        groups = [g for g in range(1, match.re.groups + 1) if match.group(g)]
        group = max(groups, key=lambda g: len(match.group(g))) if groups else 0
        if len(match.group(group)) < 8:
            group = 0
        raw = match.group(group)
        value = raw.strip(" \t\n=:\"'")
        cut = _VALUE_END.search(value)
        value = value[: cut.start()] if cut else value
        start = offset + match.start(group) + raw.find(value)
        if value and not _PLACEHOLDER.search(value) and not _is_detect_secrets_false_positive(
                value, _line_at(text, start), plugin):
            yield start, start + len(value), value
    for plugin in _plugins(_ENTROPY_PLUGINS):
        for match in plugin.regex.finditer(text):  # a quoted run of the plugin's alphabet
            value, start = match.group(2), match.start(2)
            if (len(value) >= 16 and plugin.calculate_shannon_entropy(value) > plugin.entropy_limit
                    and _is_random(value)
                    and not _is_detect_secrets_false_positive(value, _line_at(text, start), plugin)):
                yield start, start + len(value), value


# ---- names -----------------------------------------------------------------------------------------------------

_PERSON = r"([A-ZÀ-Ý][a-zà-ÿ'\-]+(?:[ \t]+(?:[A-Z]\.|[A-ZÀ-Ý][a-zà-ÿ'\-]+)){1,3})"
# (words of which one must be in the text for the pattern to have a chance, the pattern)
_WHO = ("author", "maintainer")
_NAME_CONTEXTS = [
    (_WHO, re.compile(r"""(?i:__author__|__maintainer__|\bauthors?|\bmaintainers?)\s*=\s*\[?\s*["']""" + _PERSON
                      + r"""\s*(?:<|["'])""")),
    (_WHO, re.compile(r"""(?i:["']?(?:author|maintainer)["']?\s*:\s*["'])""" + _PERSON + r"""\s*(?:<|["'])""")),
    (_WHO + ("written by", "created by", "contact:"),
     re.compile(r"(?i:@author|\bauthors?:|\bmaintainers?:|\bwritten by|\bcreated by|\bcontact:)[ \t]+" + _PERSON
                + r"(?=[ \t]*(?:<|\(|,|$)|[ \t]+on\b)", re.MULTILINE)),
    (("copyright",), re.compile(r"(?i:copyright)[ \t]+(?:\([cC]\)|©)?[ \t]*(?:\d{4}(?:[ \t]*[-,][ \t]*\d{4})*,?[ \t]+)"
                                + _PERSON + r"(?=[ \t]*<[^>\s]+@)")),
    # a name field right before an email field: {name = "...", email = "..."}, [user] name/email, <name>/<email>
    (("email",), re.compile(r"""(?i:\bname)["']?[ \t]*[:=][ \t]*["']?""" + _PERSON
                            + r"""["']?[ \t]*[,;]?\s*["']?(?i:email)\b""")),
    (("<email>",), re.compile(r"<name>" + _PERSON + r"</name>\s*<email>")),
]
_NOT_A_PERSON = re.compile(r"\b(Inc|LLC|Ltd|Corp|Corporation|Foundation|Project|Authors|Contributors|Team|"
                           r"Developers|Group|Software|Company|University|The|Python|Google|Microsoft)\b")


def find_names(text: str) -> list[Finding]:
    found = []
    lowered = text.lower()
    for triggers, pattern in _NAME_CONTEXTS:
        if not any(word in lowered for word in triggers):
            continue
        for match in pattern.finditer(text):
            if not _NOT_A_PERSON.search(match.group(1)):
                found.append(Finding("NAME", match.start(1), match.end(1), match.group(1)))
    return found


# ---- all together ----------------------------------------------------------------------------------------------

def find_pii(text: str, path: str | None = None, model=None, regex: bool = True) -> list[Finding]:
    """Every finding of the regex stage and/or a PiiModel, in order and without overlaps. Within a detector, where
    two overlap, the secret beats the address or name, then the earlier and longer one wins. Combined, the regex
    stage (the more precise) keeps what it found and the model adds what lies outside it."""
    kept: list[Finding] = []
    for candidates in ((find_secrets(text, path) + find_emails(text) + find_ips(text) + find_names(text)) if regex
                       else [], model.find(text) if model is not None else []):
        for finding in sorted(candidates, key=lambda f: (_PRIORITY[f.kind], f.start, f.start - f.end)):
            if all(finding.end <= other.start or other.end <= finding.start for other in kept):
                kept.append(finding)
    return sorted(kept, key=lambda f: f.start)


def replacement(finding: Finding) -> str:
    if finding.kind == "IP_ADDRESS":
        choices = REPLACEMENT_IPS[ipaddress.ip_address(finding.value).version]
        return choices[int.from_bytes(hashlib.sha256(finding.value.encode()).digest()[:4], "big") % len(choices)]
    return f"<{finding.kind}>"


def redact(text: str, path: str | None = None, model=None, regex: bool = True) -> tuple[str, list[Finding]]:
    """text with every finding replaced, and the findings (path: the file's name, when known; see find_pii)."""
    findings = find_pii(text, path, model, regex)
    pieces, position = [], 0
    for finding in findings:
        pieces += [text[position:finding.start], replacement(finding)]
        position = finding.end
    pieces.append(text[position:])
    return "".join(pieces), findings


def redacted_lines(redacted: str, findings: list[Finding], width: int = 160) -> list[str]:
    """For each finding, the line of the redacted text that holds its replacement (cut to width around it):
    examples for the report that show what was replaced without showing the value."""
    lines, shift = [], 0
    for finding in findings:
        start = finding.start + shift
        shift += len(replacement(finding)) - (finding.end - finding.start)
        line_start = redacted.rfind("\n", 0, start) + 1
        line_end = redacted.find("\n", start)
        line = redacted[line_start : line_end if line_end >= 0 else len(redacted)]
        offset = max(0, start - line_start - width // 2)
        lines.append(line[offset : offset + width])
    return lines
