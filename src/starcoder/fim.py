"""The one place that knows fill-in-the-middle and repository-context formats; everyone else imports them.

    PSM  <fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>          (inference format of both families)
    SPM  <fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}          (training variant used by BigCode)
    StarCoder file metadata   <reponame>{repo}<filename>{path}<gh_stars>{bucket}\\n{code}
    StarCoder2 repository     <repo_name>{repo}<file_sep>{path}\\n{code}<file_sep>{path}\\n{code}...
    FIM inside a repository   ...<file_sep><fim_prefix>{path}\\n{prefix}<fim_suffix>{suffix}<fim_middle>

The model answers a FIM prompt with the middle only, then an end token. Which formats a model speaks follows
from its vocabulary: the tokens are looked up by text (SantaCoder spells the FIM tokens with dashes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import StarCoderError
from .tokenizer import ENDOFTEXT

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

FIM_MODES = ("psm", "spm")


@dataclass(frozen=True)
class RepoFile:
    path: str
    content: str


@dataclass(frozen=True)
class PromptFormat:
    fim_prefix: str | None
    fim_middle: str | None
    fim_suffix: str | None
    fim_pad: str | None
    repo_style: str | None  # "starcoder2" (<repo_name>/<file_sep>), "starcoder" (<reponame>/<filename>), or None
    stop_tokens: tuple[str, ...]  # tokens that end a generation

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> PromptFormat:
        def first(*texts: str) -> str | None:
            return next((t for t in texts if tokenizer.token_id(t) is not None), None)

        fim = [first(f"<fim_{p}>", f"<fim-{p}>") for p in ("prefix", "middle", "suffix", "pad")]
        if first("<repo_name>") and first("<file_sep>"):
            repo_style = "starcoder2"
        elif first("<reponame>") and first("<filename>"):
            repo_style = "starcoder"
        else:
            repo_style = None
        # <file_sep> ends a StarCoder2 generation: the model moves on to another file (its most reported bug is
        # generation that runs on past it).
        eos = tokenizer.decode([tokenizer.eos_id])
        stops = [t for t in dict.fromkeys((eos, ENDOFTEXT, "<file_sep>", fim[3])) if t and tokenizer.token_id(t)
                 is not None]
        return cls(*fim, repo_style=repo_style, stop_tokens=tuple(stops))

    # ------------------------------------------------------------------ fill-in-the-middle
    def infill(self, prefix: str, suffix: str, mode: str = "psm") -> str:
        """The prompt whose completion is the text between prefix and suffix."""
        self._require_fim()
        if mode == "psm":
            return f"{self.fim_prefix}{prefix}{self.fim_suffix}{suffix}{self.fim_middle}"
        if mode == "spm":
            return f"{self.fim_prefix}{self.fim_suffix}{suffix}{self.fim_middle}{prefix}"
        raise StarCoderError(f"unknown FIM mode {mode!r}; choose one of {', '.join(FIM_MODES)}")

    def _require_fim(self) -> None:
        if not (self.fim_prefix and self.fim_middle and self.fim_suffix):
            raise StarCoderError("this tokenizer has no fill-in-the-middle tokens (<fim_prefix>, <fim_suffix>, "
                                 "<fim_middle>), so the model cannot infill")

    # ------------------------------------------------------------------ repository context
    def file_header(self, path: str | None = None, repo: str | None = None, stars: int | None = None) -> str:
        """StarCoder's per-file metadata line (each field optional); StarCoder2's file separator and path."""
        if self.repo_style == "starcoder":
            header = ""
            if repo is not None:
                header += f"<reponame>{repo}"
            if path is not None:
                header += f"<filename>{path}"
            if stars is not None:
                header += f"<gh_stars>{star_bucket(stars)}"
            return header + "\n" if header else ""
        if self.repo_style == "starcoder2":
            return f"<file_sep>{path}\n" if path is not None else ""
        raise StarCoderError("this tokenizer has no repository tokens (<reponame>/<filename> or "
                             "<repo_name>/<file_sep>)")

    def repository(self, repo: str, files: list[RepoFile], path: str, prefix: str, suffix: str | None = None,
                   stars: int | None = None) -> str:
        """A prompt for the file at `path`, with other files of the repository as context.

        With a suffix, the model fills in the middle of that file. StarCoder2 was trained on whole repositories
        in this layout; StarCoder saw files one at a time, so its context files come as separate documents,
        each with its metadata, before the current one.
        """
        if self.repo_style is None:
            self.file_header()  # raises the clear error
        if suffix is not None:
            self._require_fim()
        if self.repo_style == "starcoder2":
            context = f"<repo_name>{repo}" + "".join(f"<file_sep>{f.path}\n{f.content}" for f in files)
            if suffix is None:
                return f"{context}<file_sep>{path}\n{prefix}"
            return f"{context}<file_sep>{self.fim_prefix}{path}\n{prefix}{self.fim_suffix}{suffix}{self.fim_middle}"
        context = "".join(f"{self.file_header(f.path, repo, stars)}{f.content}{ENDOFTEXT}" for f in files)
        header = self.file_header(path, repo, stars)
        if suffix is None:
            return f"{context}{header}{prefix}"
        return f"{context}{self.fim_prefix}{header}{prefix}{self.fim_suffix}{suffix}{self.fim_middle}"


def star_bucket(stars: int) -> str:
    """StarCoder's GitHub-stars buckets: 0, 1-10, 10-100, 100-1000, 1000+."""
    if stars <= 0:
        return "0"
    for upper, name in ((10, "1-10"), (100, "10-100"), (1000, "100-1000")):
        if stars < upper:
            return name
    return "1000+"


STARCODER = PromptFormat("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "starcoder",
                         (ENDOFTEXT, "<fim_pad>"))
STARCODER2 = PromptFormat("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "starcoder2",
                          (ENDOFTEXT, "<file_sep>", "<fim_pad>"))
SANTACODER = PromptFormat("<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>", None,
                          (ENDOFTEXT, "<fim-pad>"))


# ---------------------------------------------------------------------------------------------- training transform
@dataclass(frozen=True)
class FimIds:
    """Token ids the training transform writes."""

    prefix: int
    middle: int
    suffix: int
    pad: int
    eos: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> FimIds:
        fmt = PromptFormat.for_tokenizer(tokenizer)
        fmt._require_fim()
        if fmt.fim_pad is None:
            raise StarCoderError("this tokenizer has no <fim_pad> token to pad FIM training contexts with")
        ids = [tokenizer.token_id(t) for t in (fmt.fim_prefix, fmt.fim_middle, fmt.fim_suffix, fmt.fim_pad)]
        return cls(*ids, eos=tokenizer.eos_id)


def fim_document(tokens: list[int], tokenizer: Tokenizer, ids: FimIds, rng, fim_rate: float = 0.5,
                 spm_rate: float = 0.5) -> list[int]:
    """StarCoder's per-document FIM (BigCode's Megatron `permute`): with probability fim_rate, detokenize, cut
    the text at two uniform character positions into prefix / middle / suffix, re-tokenize each part and lay
    them out as SPM (probability spm_rate) or PSM:

        PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
        SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

    `rng` is a numpy Generator; the draws happen in the reference's order (fim?, cut points, spm?).
    """
    if not tokens or rng.random() >= fim_rate:
        return tokens
    text = tokenizer.decode(tokens)
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = (tokenizer.encode(part) for part in (text[:lo], text[lo:hi], text[hi:]))
    if rng.random() < spm_rate:
        return [ids.prefix, ids.suffix, *suffix, ids.middle, *prefix, *middle]
    return [ids.prefix, *prefix, ids.suffix, *suffix, ids.middle, *middle]


def fim_context(tokens: list[int], tokenizer: Tokenizer, ids: FimIds, rng, fim_rate: float = 0.5,
                spm_rate: float = 0.5) -> list[int]:
    """FIM applied to each document of a packed training context (documents end at <|endoftext|>), then the
    context cut back to its length or right-padded with <fim_pad> (which stays in the loss, as in StarCoder)."""
    length = len(tokens)
    out: list[int] = []
    start = 0
    for i, token in enumerate(tokens):
        if token == ids.eos:
            if i > start:
                out += fim_document(tokens[start:i], tokenizer, ids, rng, fim_rate, spm_rate)
            out.append(ids.eos)
            start = i + 1
    if start < length:
        out += fim_document(tokens[start:], tokenizer, ids, rng, fim_rate, spm_rate)
    return out[:length] + [ids.pad] * (length - len(out))


def document_text(repo: str | None, path: str | None, content: str, stars: int | None, fmt: PromptFormat,
                  rng, metadata_rate: float = 0.2) -> str:
    """A training document with StarCoder's metadata: each of repository, file name and stars prepended with
    probability metadata_rate (when known). Formats without those tokens get the content alone."""
    if fmt.repo_style != "starcoder":
        return content
    keep = [rng.random() < metadata_rate for _ in range(3)]
    header = fmt.file_header(path if keep[1] else None, repo if keep[0] else None, stars if keep[2] else None)
    return header + content


def repository_text(repo: str, files: list[RepoFile]) -> str:
    """StarCoder2's repository context: <repo_name>{repo}<file_sep>{path}\\n{code}... as one training document."""
    return STARCODER2.repository(repo, files[:-1], files[-1].path, files[-1].content)
