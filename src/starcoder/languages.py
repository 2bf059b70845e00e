"""Which language a file is in, from its name: one table for the data pipeline and for training."""

from __future__ import annotations

from pathlib import Path

# File extension -> language: the languages of MultiPL-E and StarCoder's top 30 (The Stack's names, lower case),
# and the formats people keep beside code. The data pipeline selects by this table; training labels with it.
EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript", ".java": "java", ".c": "c", ".h": "c",
    ".cc": "c++", ".cpp": "c++", ".cxx": "c++", ".c++": "c++", ".hpp": "c++", ".hh": "c++", ".hxx": "c++",
    ".cu": "cuda", ".cs": "c#", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".pl": "perl",
    ".pm": "perl", ".lua": "lua", ".r": "r", ".R": "r", ".sh": "shell", ".bash": "shell", ".zsh": "shell",
    ".scala": "scala", ".d": "d", ".rkt": "racket", ".jl": "julia", ".swift": "swift", ".kt": "kotlin",
    ".kts": "kotlin", ".dart": "dart", ".hs": "haskell", ".ml": "ocaml", ".mli": "ocaml", ".ex": "elixir",
    ".exs": "elixir", ".erl": "erlang", ".clj": "clojure", ".cljs": "clojure", ".fs": "f#", ".groovy": "groovy",
    ".m": "objective-c", ".mm": "objective-c", ".f90": "fortran", ".f": "fortran", ".for": "fortran",
    ".asm": "assembly", ".s": "assembly", ".S": "assembly", ".ps1": "powershell", ".vb": "visual basic",
    ".bat": "batchfile", ".cmd": "batchfile", ".tex": "tex", ".el": "emacs lisp", ".lisp": "common lisp",
    ".scm": "scheme", ".hx": "haxe", ".ada": "ada", ".adb": "ada", ".ads": "ada", ".pas": "pascal",
    ".v": "verilog", ".sv": "systemverilog", ".vhd": "vhdl", ".zig": "zig", ".nim": "nim", ".elm": "elm",
    ".sol": "solidity", ".proto": "protocol buffer", ".tcl": "tcl", ".awk": "awk", ".vue": "vue",
    ".coffee": "coffeescript", ".cmake": "cmake", ".mk": "makefile", ".ipynb": "jupyter notebook",
    ".sql": "sql", ".md": "markdown", ".html": "html", ".htm": "html", ".css": "css", ".scss": "scss",
    ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".xml": "xml", ".rst": "restructuredtext",
}
# Files known by their whole name.
FILE_NAMES = {"Dockerfile": "dockerfile", "Makefile": "makefile", "GNUmakefile": "makefile",
              "CMakeLists.txt": "cmake", "Rakefile": "ruby", "Gemfile": "ruby", "Jenkinsfile": "groovy"}


def language_of(path: str) -> str | None:
    name = Path(path).name
    return FILE_NAMES.get(name) or EXTENSIONS.get(Path(name).suffix)
