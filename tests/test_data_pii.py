"""PII redaction: the labelled sets' precision and recall per kind against BigCode's published figures, and the
replacement rules."""

from pathlib import Path

import pytest

pytest.importorskip("detect_secrets")
pytest.importorskip("gibberish_detector")

from starcoder.data.pii import REPLACEMENT_IPS, redact  # noqa: E402
from starcoder.data.pii_labels import read_labelled, score  # noqa: E402

DATA = Path(__file__).parent / "data"
# BigCode's regex + detect-secrets figures (precision, recall) from the StarCoder paper.
PUBLISHED = {"EMAIL": (0.88, 0.96), "IP_ADDRESS": (0.80, 0.83), "KEY": (0.78, 0.53)}


@pytest.mark.parametrize("name", ["pii_labelled.txt", "pii_heldout.txt"])
def test_precision_and_recall_at_or_above_the_published_figures(name):
    snippets = read_labelled(DATA / name)
    result = score(snippets)["kinds"]
    report = {kind: (round(v["precision"], 3), round(v["recall"], 3)) for kind, v in result.items()}
    print(name, len(snippets), "snippets:", report)
    for kind, (precision, recall) in PUBLISHED.items():
        assert result[kind]["precision"] >= precision, (kind, report)
        assert result[kind]["recall"] >= recall, (kind, report)


def test_labelled_set_is_large_and_varied():
    snippets = read_labelled(DATA / "pii_labelled.txt")
    assert len(snippets) >= 150
    kinds = [label.kind for _, _, labels in snippets for label in labels]
    for kind in ("EMAIL", "IP_ADDRESS", "KEY", "PASSWORD", "NAME"):
        assert kinds.count(kind) >= 15, kind
    assert sum(1 for _, _, labels in snippets if not labels) >= 50  # look-alikes that must be kept


def test_replacements_are_the_tags_and_fixed_private_ips():
    text = ('owner = "dana.wells@quarry.io"  # server 52.14.203.77, backup 52.14.203.77, db 10.0.0.3\n'
            'token = "ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"\npassword = "Tr0ub4dor&3"\n'
            '__author__ = "Dana Wells"\nmirror = "2a00:1450:4001:82a::200e"\n')
    redacted, findings = redact(text)
    assert [f.kind for f in findings] == ["EMAIL", "IP_ADDRESS", "IP_ADDRESS", "KEY", "PASSWORD", "NAME",
                                          "IP_ADDRESS"]
    assert 'owner = "<EMAIL>"' in redacted and 'token = "<KEY>"' in redacted
    assert 'password = "<PASSWORD>"' in redacted and '__author__ = "<NAME>"' in redacted
    assert "db 10.0.0.3" in redacted  # private addresses stay
    replaced_v4 = redacted.split("server ")[1].split(",")[0]
    assert replaced_v4 in REPLACEMENT_IPS[4] and f"backup {replaced_v4}" in redacted  # same value, same address
    assert any(f'mirror = "{ip}"' in redacted for ip in REPLACEMENT_IPS[6])


def test_same_value_gets_the_same_replacement_across_documents():
    first, _ = redact("connect('81.2.69.142')")
    second, _ = redact("# the host 81.2.69.142 is down\n")
    assert first.split("'")[1] == second.split("host ")[1].split(" ")[0]


def test_nothing_to_redact_leaves_text_unchanged():
    text = "def add(a, b):\n    return a + b  # see 1.2.3.4 and sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4\n"
    assert redact(text) == (text, [])
