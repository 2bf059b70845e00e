"""Labelled training documents for the PII model: real permissively licensed code with synthesized PII in it.

The carrier code is the embedded model's corpus (CPython's standard library and permissively licensed packages,
already through the PII stage: its `<NAME>`, `<EMAIL>`, `<KEY>` and `<PASSWORD>` placeholders are filled with new
synthesized values of the kind, so those values sit in real contexts). Into an excerpt of a carrier file go a few
lines from TEMPLATES: PII in the places it is found in code of many languages (headers, configuration, code,
shell, manifests), and look-alikes that must stay unlabelled (hashes, versions, UUIDs, private and documentation
addresses, popular DNS servers, example.com addresses, documented example keys, environment references). A share
of documents are configuration-sized bundles of templates alone.

Labels are the kinds of the PII stage plus USERNAME (as StarPII's; BigCode's post-filters drop it, and learning it
keeps the model from calling user names passwords or names). No value of the project's held-out set
(tests/data/pii_heldout.txt) is ever produced: its values are excluded by name.
"""

from __future__ import annotations

import ipaddress
import json
import lzma
import random
import re
import string
import uuid
from pathlib import Path

ROOT = Path(__file__).parents[2]
CORPUS = ROOT / "src" / "starcoder" / "assets" / "model" / "corpus.jsonl.xz"
HELD_OUT = ROOT / "tests" / "data" / "pii_heldout.txt"


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    "Aaliyah Abdul Adaeze Adrian Agnieszka Ahmed Aisha Akira Alejandro Aleksander Alice Amir Ana Anders "
    "Andrea Anh Anika Arjun Astrid Ayumi Beatriz Benedikt Bilal Camille Carmen Catalina Chidi Chioma "
    "Claire Daniel Daria David Deepika Diego Dong Eduardo Elif Emeka Emil Eva Farid Felipe Florian "
    "Francesca Gabriel Gustavo Hamza Harriet Helga Hiroshi Hyun Ibrahim Ingrid Isabel Jakub Jamal Jan "
    "Javier Jia Joanna Johan Jorge Julien Kai Kamala Karin Katarzyna Kofi Lars Laura Leila Li Lina "
    "Lorenzo Lucas Luis Magnus Malik Marco Maria Marta Martin Mei Mehmet Mia Michael Miguel Min Mohammed "
    "Nadia Naomi Nikolai Nina Nomvula Oscar Pablo Paolo Patrick Paul Petra Rafael Rania Raul Rebecca "
    "Ricardo Rin Robert Rosa Ruth Samuel Sanjay Sara Sebastian Sergei Shreya Simon Siobhan Sipho Stefan "
    "Sven Takeshi Tariq Thomas Tobias Valentina Vikram Viktor Wanjiru Xavier Yara Yusuf Zainab Zhou"
)
LAST = _words(
    "Abara Adeyemi Almeida Andersen Arslan Bakker Banerjee Bauer Bergstrom Bianchi Brennan Castillo "
    "Chaudhry Choi Costa Cruz Dahl Dimitrov Dlamini Eriksson Esposito Ferreira Fitzgerald Fontaine "
    "Gallagher Garcia Gonzalez Gupta Hakimi Hansen Hashemi Herrera Hoffmann Horvat Ibrahim Iyer Jansen "
    "Jovanovic Kaminski Kang Kariuki Kaur Keller Khan Kim Klein Kovacs Kruger Laine Larsen Lehmann Lopez "
    "Lund Marino Mensah Meyer Mikkelsen Molina Murphy Nakamura Nascimento Nielsen Novak Nowak Obi Okonkwo "
    "Olsen Ortiz Osei Park Pereira Petrov Popescu Quinn Ramirez Rao Reyes Richter Rivera Romero Sandoval "
    "Santos Sato Schneider Sharma Smirnov Suzuki Svensson Takahashi Torres Van_der_Berg Varga Vasquez "
    "Wagner Walsh Wang Wojcik Yamamoto Yilmaz Zhou Zimmermann"
)
WORDS = _words(
    "apex atlas beacon birch cobalt comet delta ember falcon fern garnet harbor helix indigo juniper "
    "kestrel lumen maple meadow nimbus onyx orbit pebble pioneer quartz raven ridge sable sierra solstice "
    "spruce tidal tundra umber vertex willow zephyr"
)
FREE_MAIL = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "proton.me", "icloud.com", "gmx.de", "web.de",
             "mail.ru", "yandex.ru", "qq.com", "163.com", "naver.com", "orange.fr", "libero.it", "uol.com.br")
TLDS = ("com", "io", "dev", "org", "net", "de", "fr", "co.uk", "com.au", "ac.in", "edu", "nl", "se", "co.jp", "ch")
ORGS = ("Python Software Foundation", "The Apache Software Foundation", "Google LLC", "Microsoft Corporation",
        "The Linux Foundation", "Mozilla Foundation", "Red Hat, Inc.", "The Go Authors", "The Rust Project Developers",
        "Meta Platforms, Inc.", "Free Software Foundation", "The Chromium Authors", "Acme Corp", "NumPy Developers")
POPULAR_DNS = ("8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "208.67.222.222", "2001:4860:4860::8888")
AWS_EXAMPLES = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

# Uppercase slots are labelled PII of that kind; lowercase slots are look-alikes left unlabelled.
TEMPLATES = [
    '# Author: {NAME} <{EMAIL}>', '__author__ = "{NAME}"', '__email__ = "{EMAIL}"', ':author: {NAME}',
    '# Copyright (c) {year} {NAME}', '// Copyright {year} {NAME}. All rights reserved.', ' * @author {NAME}',
    ' * @author {NAME} ({EMAIL})', '# Maintainer: {NAME} <{EMAIL}>', 'MAINTAINER {NAME} <{EMAIL}>',
    'LABEL maintainer="{EMAIL}"', '  "author": "{NAME} <{EMAIL}>",', 'authors = ["{NAME} <{EMAIL}>"]',
    '    <developer><name>{NAME}</name><email>{EMAIL}</email></developer>', "  s.authors = ['{NAME}']",
    "  s.email = '{EMAIL}'", '# Thanks to {NAME} for the original patch.', '# Written by {NAME}, {year}.',
    "git config --global user.name '{NAME}'", 'git config --global user.email "{EMAIL}"',
    'ADMINS = [("{NAME}", "{EMAIL}")]', 'send_mail(subject, body, "{EMAIL}", ["{EMAIL}"])',
    'mail.setFrom(new InternetAddress("{EMAIL}"));', '$mail->addAddress(\'{EMAIL}\', \'{NAME}\');',
    'contact: {EMAIL}', 'SUPPORT_EMAIL={EMAIL}', 'email: "{EMAIL}"', '%% @author {NAME} <{EMAIL}>',
    'HOST = "{IP_ADDRESS}"', 'server {IP_ADDRESS}:{port};', '  host: {IP_ADDRESS}', 'ssh deploy@{IP_ADDRESS}',
    'curl -s http://{IP_ADDRESS}:{port}/health', 'sock.connect(("{IP_ADDRESS}", {port}))',
    'Allow from {IP_ADDRESS}', 'const API = "http://{IP_ADDRESS}:{port}/v1";', 'upstream_ip = "{IP_ADDRESS}"',
    '- targets: ["{IP_ADDRESS}:{port}"]', 'DB_HOST={IP_ADDRESS}', 'conn, err := net.Dial("tcp", "{IP_ADDRESS}:{port}")',
    'AWS_ACCESS_KEY_ID={KEY}', 'aws_secret_access_key = {KEY}', 'API_KEY = "{KEY}"', 'export GITHUB_TOKEN={KEY}',
    '  "apiKey": "{KEY}",', "headers = {{'Authorization': 'Bearer {KEY}'}}", 'stripe.api_key = "{KEY}"',
    'const token = "{KEY}";', 'SLACK_BOT_TOKEN: {KEY}', 'client = OpenAI(api_key="{KEY}")', 'secret_key: "{KEY}"',
    '$apiKey = \'{KEY}\';', 'String secret = "{KEY}";', 'os.environ["SENDGRID_API_KEY"] = "{KEY}"',
    'private static final String API_TOKEN = "{KEY}";', 'auth_token = "{KEY}"', 'SECRET_KEY = "{KEY}"',
    'password = "{PASSWORD}"', 'DB_PASSWORD={PASSWORD}', 'spring.datasource.password={PASSWORD}',
    '  "password": "{PASSWORD}",', 'mysql -u root -p{PASSWORD} app', 'PGPASSWORD={PASSWORD} psql -h db -U app',
    'login(username, "{PASSWORD}")', 'DATABASE_URL = "postgres://app:{PASSWORD}@db:5432/app"', '  password: {PASSWORD}',
    '$db_pass = "{PASSWORD}";', 'conn = psycopg2.connect(user="app", password="{PASSWORD}")', 'PASS={PASSWORD}',
    'user = "{USERNAME}"', 'username: {USERNAME}', 'ossrhUsername={USERNAME}', '# TODO({USERNAME}): handle retries',
    'https://github.com/{USERNAME}/{word}', 'login(user="{USERNAME}", password="{PASSWORD}")', 'DB_USER={USERNAME}',
    'proxy_pass http://{IP_ADDRESS}:{port};', 'listen {IP_ADDRESS}:{port};', '{IP_ADDRESS}    {word}.{word}.net',
    'iptables -A INPUT -s {IP_ADDRESS} -j ACCEPT', '  - {IP_ADDRESS}', 'servers = ["{IP_ADDRESS}", "{IP_ADDRESS}"]',
    "INSERT INTO hosts (ip) VALUES ('{IP_ADDRESS}');",
    '{IP_ADDRESS} - - [12/Mar/2023:10:01:22 +0000] "GET / HTTP/1.1" 200',
    '$server = "{IP_ADDRESS}";', 'externalIPs: ["{IP_ADDRESS}"]', 'cidr_blocks = ["{IP_ADDRESS}/32"]',
    '# deployed on {IP_ADDRESS}', 'redis = Redis(host="{IP_ADDRESS}", port={port})', '"{IP_ADDRESS}": "{word}",',
    "    author='{NAME}',", '    author="{NAME}",', 'authors = [{{ name = "{NAME}", email = "{EMAIL}" }}]',
    '"""{word} utilities.\n\nAuthor: {NAME}\n"""', ' * Author: {NAME}', '# {year} {NAME} <{EMAIL}>',
    "  spec.authors = ['{NAME}']", '<author>{NAME}</author>', 'Signed-off-by: {NAME} <{EMAIL}>',
    '# Contributors: {NAME}, {NAME}', '"maintainer": "{NAME}",', 'Reported-by: {NAME}', ':copyright: {year} {NAME}',
    '"password": "{PASSWORD}"', "MYSQL_ROOT_PASSWORD: {PASSWORD}", 'ADMIN_PASSWORD = "{PASSWORD}"',
    'export DB_PASS="{PASSWORD}"', '<password>{PASSWORD}</password>', 'redis-cli -a {PASSWORD} ping',
    'private String password = "{PASSWORD}";', "user: {USERNAME}\npassword: {PASSWORD}",
    'mail.login("{EMAIL}", "{PASSWORD}")', '# contact {EMAIL} for access', '<a href="mailto:{EMAIL}">{NAME}</a>',
    'Reply-To: {EMAIL}', 'email = {EMAIL}', '"email": "{EMAIL}",', 'Please report bugs to {EMAIL}.',
    # look-alikes: nothing here is PII
    'sha256 = "{hex64}"', 'commit {hex40}', '"integrity": "sha1-{b64}"', 'CHECKSUM = "{hex32}"', 'id = "{uuid}"',
    'REQUEST_ID = uuid.UUID("{uuid}")', '__version__ = "{version}"', 'version: {version}', 'HOST = "{private_ip}"',
    'server {private_ip}:{port};', 'nameserver {dns}', 'resolvers = ["{dns}"]', 'bind_address = "0.0.0.0"',
    'send_invite("{example_email}")', '# Copyright (c) {year} {org}', '# Copyright {year} {org}. All rights reserved.',
    'password = os.environ["DB_PASSWORD"]', 'password = getpass.getpass()', 'password: ${{DB_PASSWORD}}',
    'API_KEY = os.getenv("API_KEY")', 'api_key = "<your-api-key>"', 'AWS_ACCESS_KEY_ID={aws_example}',
    'PASSWORD_MIN_LENGTH = {port}', 'token = request.headers.get("Authorization")', 'ip = "{documentation_ip}"',
    'listen {private_ip}:{port};', 'proxy_pass http://{private_ip}:{port};', 'version = "{version}"',
    'password = ""', 'password: null', 'key = hashlib.sha256(data).hexdigest()  # {hex64}', 'etag = "{hex32}"',
    '# see {example_email} for the format', 'min_version = "{version}"', 'GIT_SHA = "{hex40}"',
    '  "version": "{version}",', 'FROM python:3.{minor}-slim@sha256:{hex64}', 'cache_key = "{hex40}"',
]
_SLOT = re.compile(r"\{\{|\}\}|\{(\w+)\}")


class Synth:
    """Random values of every slot, never one of the held-out set's."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        from starcoder.data.pii_labels import read_labelled

        self.forbidden = {f.value for _, _, labels in read_labelled(HELD_OUT) for f in labels}

    def value(self, slot: str) -> str:
        for _ in range(100):
            value = getattr(self, slot.lower())()
            if value not in self.forbidden:
                return value
        raise RuntimeError(f"no fresh value for {slot}")

    def _chars(self, alphabet: str, n: int) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def name(self) -> str:
        r = self.rng
        first, last = r.choice(FIRST), r.choice(LAST).replace("_", " ")
        middle = f" {r.choice(string.ascii_uppercase)}." if r.random() < 0.15 else ""
        return f"{first}{middle} {last}" if r.random() < 0.9 else f"{first} {r.choice(LAST)}-{last}"

    def email(self) -> str:
        r = self.rng
        first, last = r.choice(FIRST).lower(), r.choice(LAST).lower().replace("_", "")
        local = r.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}", f"{first}{r.randrange(100)}",
                          f"{last}.{first[0]}", f"{first}+{r.choice(WORDS)}", self.username()])
        company = f"{r.choice(WORDS)}{r.choice(['', '-labs', 'soft', 'hq'])}.{r.choice(TLDS)}"
        domain = r.choice(FREE_MAIL) if r.random() < 0.5 else company
        return f"{local}@{domain}"

    def ip_address(self) -> str:
        while True:
            if self.rng.random() < 0.8:
                address = ipaddress.IPv4Address(self.rng.getrandbits(32))
            else:
                address = ipaddress.IPv6Address((0x2 << 124) | self.rng.getrandbits(120))
            if address.is_global and not address.is_multicast and str(address) not in POPULAR_DNS:
                return str(address)

    def key(self) -> str:
        r, alnum = self.rng, string.ascii_letters + string.digits
        upper = string.ascii_uppercase + string.digits
        kind = r.randrange(14)
        return [
            lambda: "AKIA" + self._chars(upper, 16),
            lambda: self._chars(alnum + "/+", 40),
            lambda: "ghp_" + self._chars(alnum, 36),
            lambda: "github_pat_" + self._chars(alnum, 22) + "_" + self._chars(alnum, 59),
            lambda: f"xoxb-{r.randrange(10**10, 10**11)}-{r.randrange(10**12, 10**13)}-" + self._chars(alnum, 24),
            lambda: r.choice(["sk_live_", "rk_live_", "sk_test_"]) + self._chars(alnum, 24),
            lambda: "SG." + self._chars(alnum + "-_", 22) + "." + self._chars(alnum + "-_", 43),
            lambda: "AIza" + self._chars(alnum + "-_", 35),
            lambda: self._chars("0123456789abcdef", r.choice([32, 40])),
            lambda: "glpat-" + self._chars(alnum + "-_", 20),
            lambda: "sk-" + self._chars(alnum, 48),
            lambda: "npm_" + self._chars(alnum, 36),
            lambda: "AC" + self._chars("0123456789abcdef", 32),
            lambda: ".".join(self._chars(alnum + "-_", n) for n in (36, r.randrange(40, 90), 43)),  # a JWT's shape
        ][kind]()

    def password(self) -> str:
        r = self.rng
        word = r.choice(WORDS + [w.lower() for w in FIRST[:40]])
        return r.choice([
            lambda: word.capitalize() + str(r.randrange(10, 9999)) + r.choice("!@#$%&*?"),
            lambda: word.replace("a", "4").replace("e", "3").replace("o", "0") + r.choice(["!", "#", "2023", "_1"]),
            lambda: self._chars(string.ascii_letters + string.digits + "!@#$%^&*-_", r.randrange(10, 21)),
            lambda: "-".join(r.choice(WORDS) for _ in range(3)) + str(r.randrange(10)),
            lambda: word + r.choice(["123", "2021", "pass", "!"]) + self._chars(string.digits, 2),
        ])()

    def username(self) -> str:
        r = self.rng
        first, last = r.choice(FIRST).lower(), r.choice(LAST).lower().replace("_", "")
        return r.choice([f"{first[0]}{last}", f"{first}{r.randrange(10, 99)}", f"{r.choice(WORDS)}-{first}",
                         f"{first}_{r.choice(WORDS)}", f"{last}{first[0]}", f"{r.choice(WORDS)}{r.randrange(1000)}"])

    def hex32(self) -> str:
        return self._chars("0123456789abcdef", 32)

    def hex40(self) -> str:
        return self._chars("0123456789abcdef", 40)

    def hex64(self) -> str:
        return self._chars("0123456789abcdef", 64)

    def b64(self) -> str:
        return self._chars(string.ascii_letters + string.digits + "+/", 27) + "="

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def version(self) -> str:
        return ".".join(str(self.rng.randrange(0, 20)) for _ in range(self.rng.choice([3, 3, 4])))

    def private_ip(self) -> str:
        r = self.rng
        return r.choice([f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}",
                         f"192.168.{r.randrange(256)}.{r.randrange(1, 255)}",
                         f"172.{r.randrange(16, 32)}.{r.randrange(256)}.{r.randrange(1, 255)}", "127.0.0.1"])

    def documentation_ip(self) -> str:
        return self.rng.choice(["192.0.2.", "198.51.100.", "203.0.113."]) + str(self.rng.randrange(1, 255))

    def dns(self) -> str:
        return self.rng.choice(POPULAR_DNS)

    def example_email(self) -> str:
        return f"{self.rng.choice(FIRST).lower()}@example.{self.rng.choice(['com', 'org', 'net'])}"

    def aws_example(self) -> str:
        return self.rng.choice(AWS_EXAMPLES)

    def org(self) -> str:
        return self.rng.choice(ORGS)

    def word(self) -> str:
        return self.rng.choice(WORDS)

    def year(self) -> str:
        return str(self.rng.randrange(1995, 2026))

    def port(self) -> str:
        return str(self.rng.choice([22, 80, 443, 3306, 5432, 6379, 8000, 8080, 8443, 9090, 9100, 27017]))

    def minor(self) -> str:
        return str(self.rng.randrange(8, 14))


def fill(template: str, synth: Synth, base: int = 0) -> tuple[str, list[tuple[str, int, int]]]:
    """The template with every slot filled ({{ and }} are literal braces), and the (kind, start, end) of its
    uppercase (PII) slots, counted from `base`."""
    out, spans, position, length = [], [], 0, base
    for match in _SLOT.finditer(template):
        out.append(template[position:match.start()])
        length += match.start() - position
        slot = match.group(1)
        value = match.group()[0] if slot is None else synth.value(slot)
        if slot and slot.isupper():
            spans.append((slot, length, length + len(value)))
        out.append(value)
        length += len(value)
        position = match.end()
    out.append(template[position:])
    return "".join(out), spans


def carriers() -> list[str]:
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["content"] for line in f]


_PLACEHOLDER = re.compile(r"<(NAME|EMAIL|KEY|PASSWORD)>")


def document(synth: Synth, code: list[str]) -> dict:
    """One labelled document in BigCode's PII dataset format: text and fragments."""
    r = synth.rng
    if r.random() < 0.25:  # a configuration-sized bundle of templates alone
        lines = [r.choice(TEMPLATES) for _ in range(r.randrange(1, 8))]
    else:
        source = r.choice(code).splitlines()
        start = r.randrange(max(1, len(source) - 10))
        # carrier code becomes a template whose only slots are the pipeline's placeholders
        lines = [_PLACEHOLDER.sub(lambda m: "{" + m.group(1) + "}", line.replace("{", "{{").replace("}", "}}"))
                 for line in source[start : start + r.randrange(8, 40)]]
        for _ in range(r.randrange(0, 4)):
            lines.insert(r.randrange(len(lines) + 1), r.choice(TEMPLATES))
    text, fragments = [], []
    length = 0
    for line in lines:
        filled, spans = fill(line, synth, length)
        text.append(filled + "\n")
        length += len(filled) + 1
        fragments += [{"category": kind, "position": [start, end], "value": None} for kind, start, end in spans]
    content = "".join(text)
    for fragment in fragments:
        fragment["value"] = content[fragment["position"][0] : fragment["position"][1]]
    return {"text": content, "fragments": fragments}
