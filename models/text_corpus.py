"""A text corpus built at run time from the Python standard library's own docstrings, and its character vocabulary.

**Source and licence.** The documents are the docstrings that the running interpreter's standard library carries:
for every module of the fixed list :data:`STANDARD_LIBRARY_MODULES` that imports, the module docstring, then in
name order each public class and function defined in that module (``obj.__module__ == module``), a class followed
by the public methods, properties, class and static methods of its own ``__dict__`` in name order; the text is
``inspect.getdoc`` (indentation cleaned). These docstrings are part of CPython's source, distributed under the
Python Software Foundation License Version 2 (the PSF licence, GPL-compatible, permissive); qgraph commits none of
the text, it reads it from the installed interpreter (``sys.version`` enters the corpus fingerprint, since another
Python release has other docstrings).

**Determinism.** The module list is a literal tuple (not ``sys.stdlib_module_names``, a set whose content changes
between releases); members are visited in sorted name order; a docstring equal to one already taken (inherited
or shared text) is skipped, so no text appears twice in the corpus, and in particular never in two parts.

**Parts and splits.** A module's place depends only on its name: ``b = sha256(name)[0]``; the module belongs to the
``"encoder"`` part when ``b`` is even and to the ``"decoder"`` part when it is odd, and within its part to the
``"test"`` split when ``(b // 2) % 8 == 0`` (one module in eight: held out, the reported metric), to the
``"validation"`` split when ``(b // 2) % 8 == 1`` (another one in eight: held out, selects the checkpoint), else to
``"train"``. The two parts are disjoint by module and by text: the encoder of issue 15 and the decoder of issue 16
never see each other's text, and neither trains on its own held-out modules.

**Vocabulary.** Character level: five special tokens ``[PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4``,
then every character that occurs at least ``minimum_count`` times in the training splits of both parts, in code
point order. Any other character encodes as ``[UNK]``.

**Sequences.** Encoder (:func:`packed_sequences`): documents are encoded, split into pieces of at most ``length - 2``
characters, and packed greedily in corpus order: a sequence is ``[CLS] piece [SEP] piece [SEP] …`` while the next
piece fits, then ``[PAD]``-filled to ``length``, with ``attention_mask`` 1 on the real tokens; so sequences carry
padding, as real batches do. Decoder (:func:`token_windows`): the documents of a split joined into one stream, each
followed by ``[SEP]`` (the end-of-text token), cut into non-overlapping windows of ``length + 1`` tokens (inputs
``w[:-1]``, next-token targets ``w[1:]``); the tail shorter than a window is dropped.

**Masked-language-model targets** (:func:`mask_tokens`, BERT's recipe): each real, non-special position is chosen
with probability ``rate``; a chosen token is replaced by ``[MASK]`` with probability 0.8, by a uniformly drawn
ordinary token with probability 0.1, and left as it is with probability 0.1; the targets are the original tokens at
the chosen positions, whose flat indices (``row · length + column``) are returned with them.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

PARTS = ("encoder", "decoder")
SPLITS = ("train", "validation", "test")
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
HELD_OUT_BUCKETS = 8

#: Standard-library modules whose docstrings make the corpus, in corpus order. Modules deprecated by PEP 594 are left
#: out (importing them warns); a module that does not import on this interpreter is skipped (logged).
STANDARD_LIBRARY_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.runners", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "atexit",
    "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop",
    "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures.process",
    "concurrent.futures.thread", "configparser", "contextlib", "contextvars", "copy", "copyreg", "cProfile", "csv",
    "ctypes", "dataclasses", "datetime", "dbm", "dbm.dumb", "decimal", "difflib", "dis", "doctest", "email.charset",
    "email.encoders", "email.feedparser", "email.generator", "email.header", "email.headerregistry",
    "email.iterators", "email.message", "email.parser", "email.policy", "email.utils", "enum", "errno",
    "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "getpass",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http",
    "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc",
    "importlib.machinery", "importlib.metadata", "importlib.resources", "importlib.util", "inspect", "io",
    "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "mmap",
    "modulefinder", "multiprocessing.connection", "multiprocessing.context", "multiprocessing.managers",
    "multiprocessing.pool", "multiprocessing.process", "multiprocessing.queues", "multiprocessing.shared_memory",
    "multiprocessing.synchronize", "netrc", "ntpath", "numbers", "opcode", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib",
    "rlcompleter", "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal",
    "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "stringprep",
    "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types",
    "typing", "unicodedata", "unittest.case", "unittest.loader", "unittest.main", "unittest.mock",
    "unittest.result", "unittest.runner", "unittest.suite", "urllib.error", "urllib.parse", "urllib.request",
    "urllib.response", "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


@dataclass(frozen=True)
class Document:
    """One docstring: the module it comes from, the dotted name of the documented object, and its text."""

    module: str
    name: str
    text: str


def module_bucket(module: str) -> int:
    """The first byte of ``sha256(module)``: decides the module's part and split (module docstring)."""
    return hashlib.sha256(module.encode("utf-8")).digest()[0]


def module_part(module: str) -> str:
    """``"encoder"`` or ``"decoder"``."""
    return PARTS[module_bucket(module) % 2]


def module_split(module: str) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` (one module in :data:`HELD_OUT_BUCKETS` for each held-out split)."""
    bucket = (module_bucket(module) // 2) % HELD_OUT_BUCKETS
    return {0: "test", 1: "validation"}.get(bucket, "train")


def _is_member_routine(value: object) -> bool:
    return (inspect.isfunction(value) or inspect.isbuiltin(value) or inspect.ismethoddescriptor(value)
            or isinstance(value, property))


def _module_documents(module_name: str, seen: set[str]) -> list[Document]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        logger.info("standard-library module %s does not import here (%s); skipped", module_name, error)
        return []
    documents: list[Document] = []

    def take(name: str, value: object) -> None:
        text = inspect.getdoc(value)
        text = text.strip() if isinstance(text, str) else ""
        if text and text not in seen:
            seen.add(text)
            documents.append(Document(module_name, name, text))

    take(module_name, module)
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        if inspect.isclass(value):
            take(f"{module_name}.{name}", value)
            for member_name, member in sorted(vars(value).items()):
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if _is_member_routine(member):
                    take(f"{module_name}.{name}.{member_name}", member)
        elif inspect.isfunction(value) or inspect.isbuiltin(value):
            take(f"{module_name}.{name}", value)
    return documents


@functools.cache
def standard_library_documents(modules: tuple[str, ...] = STANDARD_LIBRARY_MODULES) -> tuple[Document, ...]:
    """Every document of the corpus, in corpus order (see the module docstring)."""
    seen: set[str] = set()
    documents: list[Document] = []
    with warnings.catch_warnings():  # importing some modules, and reading typing.io's docstring, warn
        warnings.simplefilter("ignore")
        for module_name in modules:
            documents.extend(_module_documents(module_name, seen))
    logger.info("text corpus: %d docstrings, %d characters, from %d modules of Python %s", len(documents),
                sum(len(document.text) for document in documents), len({document.module for document in documents}),
                sys.version.split()[0])
    return tuple(documents)


def corpus_documents(part: str, split: str, *, modules: tuple[str, ...] = STANDARD_LIBRARY_MODULES
                     ) -> tuple[Document, ...]:
    """The documents of one part (``"encoder"``/``"decoder"``) and split (``"train"``/``"validation"``/``"test"``)."""
    if part not in PARTS or split not in SPLITS:
        raise ValueError(f"part must be one of {PARTS} and split one of {SPLITS}, got {part!r}, {split!r}")
    return tuple(document for document in standard_library_documents(modules)
                 if module_part(document.module) == part and module_split(document.module) == split)


@dataclass(frozen=True)
class CharacterVocabulary:
    """Special tokens, then single characters; ids are positions in :attr:`tokens`."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with the special tokens {SPECIAL_TOKENS}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        object.__setattr__(self, "_index", {token: index for index, token in enumerate(self.tokens)})

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def ordinary_ids(self) -> range:
        """Ids of the character tokens (what random MLM replacements draw from)."""
        return range(len(SPECIAL_TOKENS), len(self.tokens))

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of the characters of ``text`` (unknown characters → ``[UNK]``)."""
        index = self._index  # type: ignore[attr-defined]
        return np.fromiter((index.get(character, UNK_ID) for character in text), dtype=np.int64, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[int(token)] for token in ids)

    def fingerprint(self) -> str:
        return hashlib.sha256("\x00".join(self.tokens).encode("utf-8")).hexdigest()


def build_vocabulary(documents: Iterable[Document], *, minimum_count: int = 3) -> CharacterVocabulary:
    """Special tokens, then the characters occurring at least ``minimum_count`` times, in code point order."""
    counts: collections.Counter[str] = collections.Counter()
    for document in documents:
        counts.update(document.text)
    characters = sorted(character for character, count in counts.items() if count >= minimum_count)
    return CharacterVocabulary(SPECIAL_TOKENS + tuple(characters))


@functools.cache
def corpus_vocabulary(minimum_count: int = 3) -> CharacterVocabulary:
    """The vocabulary of both parts' training splits (shared by the encoder and the decoder)."""
    training = [document for part in PARTS for document in corpus_documents(part, "train")]
    return build_vocabulary(training, minimum_count=minimum_count)


def corpus_fingerprint(minimum_count: int = 3) -> str:
    """sha256 of the interpreter version, every document with its part and split, and the vocabulary: what a cached
    model trained on this corpus depends on."""
    digest = hashlib.sha256(sys.version.encode("utf-8"))
    for document in standard_library_documents():
        digest.update(f"{module_part(document.module)}/{module_split(document.module)}/{document.name}\x00"
                      .encode())
        digest.update(document.text.encode("utf-8"))
    digest.update(corpus_vocabulary(minimum_count).fingerprint().encode("ascii"))
    return digest.hexdigest()


def _pieces(documents: Sequence[Document], vocabulary: CharacterVocabulary, size: int) -> list[np.ndarray]:
    pieces = []
    for document in documents:
        ids = vocabulary.encode(document.text)
        pieces.extend(ids[start:start + size] for start in range(0, len(ids), size))
    return pieces


def packed_sequences(documents: Sequence[Document], vocabulary: CharacterVocabulary, length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, both int64 ``N × length``: documents packed as ``[CLS] a [SEP] b [SEP] …``."""
    if length < 3:
        raise ValueError(f"a packed sequence needs length >= 3, got {length}")
    rows: list[list[int]] = []
    current: list[int] = [CLS_ID]
    for piece in _pieces(documents, vocabulary, length - 2):
        if len(current) + len(piece) + 1 > length:
            rows.append(current)
            current = [CLS_ID]
        current.extend(int(token) for token in piece)
        current.append(SEP_ID)
    if len(current) > 1:
        rows.append(current)
    input_ids = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)] = row
        attention_mask[index, :len(row)] = 1
    return input_ids, attention_mask


def token_windows(documents: Sequence[Document], vocabulary: CharacterVocabulary, length: int) -> np.ndarray:
    """int64 ``N × (length + 1)`` windows of the ``[SEP]``-terminated document stream (inputs ``[:, :-1]``, targets
    ``[:, 1:]``)."""
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    stream = np.concatenate([np.append(vocabulary.encode(document.text), SEP_ID) for document in documents]
                            or [np.zeros(0, np.int64)])
    count = len(stream) // (length + 1)
    return stream[:count * (length + 1)].reshape(count, length + 1).astype(np.int64)


def mask_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, vocabulary: CharacterVocabulary,
                generator: np.random.Generator, *, rate: float = 0.15
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(masked_ids, positions, labels)``: BERT's 80/10/10 masking (module docstring); ``positions`` are flat
    indices into ``input_ids`` (int64), ``labels`` the original tokens there. At least one position is chosen."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    candidates = (attention_mask != 0) & (input_ids >= len(SPECIAL_TOKENS))
    chosen = candidates & (generator.random(input_ids.shape) < rate)
    if not chosen.any():
        flat = np.flatnonzero(candidates)
        if flat.size == 0:
            raise ValueError("no maskable token in the batch (only special tokens or padding)")
        chosen.flat[flat[generator.integers(flat.size)]] = True
    positions = np.flatnonzero(chosen).astype(np.int64)
    labels = input_ids.reshape(-1)[positions].copy()
    masked = input_ids.copy()
    draw = generator.random(positions.size)
    replace_by_mask = draw < 0.8
    replace_by_random = (draw >= 0.8) & (draw < 0.9)
    masked.flat[positions[replace_by_mask]] = MASK_ID
    ordinary = vocabulary.ordinary_ids
    masked.flat[positions[replace_by_random]] = generator.integers(ordinary.start, ordinary.stop,
                                                                   size=int(replace_by_random.sum()))
    return masked, positions, labels
