"""The default training corpus: bytes of the Python standard library's source.

Every machine with Python has it, so examples train without downloads or a
tokenizer; tokens are raw bytes (0..255), matching byte-level vocabularies.
"""

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

_MIN_CORPUS_BYTES = 64 << 10


def stdlib_corpus(max_bytes: int = 4 << 20) -> torch.Tensor:
    """Up to ``max_bytes`` bytes of stdlib ``*.py`` sources as a 1-D long tensor.

    Files are read in sorted path order so the corpus is the same on every run;
    test directories and site-packages are skipped.
    """
    if max_bytes < _MIN_CORPUS_BYTES:
        raise ValueError(
            f"max_bytes={max_bytes} is too small; expected at least {_MIN_CORPUS_BYTES}"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = bytearray()
    for path in sorted(root.rglob("*.py")):
        # Filter on the path inside the stdlib, so where Python is installed cannot matter.
        relative = "/" + path.relative_to(root).as_posix()
        if "/test" in relative or "site-packages" in relative:
            continue
        try:
            source = path.read_bytes()
        except OSError:
            continue  # unreadable files are simply not part of the corpus
        corpus += source + b"\n"
        if len(corpus) >= max_bytes:
            break
    del corpus[max_bytes:]
    if len(corpus) < _MIN_CORPUS_BYTES:
        raise RuntimeError(
            f"found only {len(corpus)} bytes of Python source under the stdlib directory "
            f"{root}; the corpus needs at least {_MIN_CORPUS_BYTES}"
        )
    return torch.frombuffer(corpus, dtype=torch.uint8).to(torch.long)


def batches(
    tokens: torch.Tensor, batch: int, seq: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(input_ids, labels)`` pairs of shape ``(batch, seq)`` at random offsets.

    ``labels`` are the inputs shifted one token ahead. The same ``seed`` always
    gives the same stream.
    """
    if tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} and dtype {tokens.dtype}; "
            "expected a 1-D torch.long tensor"
        )
    if batch < 1:
        raise ValueError(f"batch={batch} is invalid; expected an integer >= 1")
    if seq < 1:
        raise ValueError(f"seq={seq} is invalid; expected an integer >= 1")
    if tokens.numel() < seq + 1:
        raise ValueError(
            f"tokens has {tokens.numel()} elements; seq={seq} needs at least seq + 1 = {seq + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    window = torch.arange(seq)
    # Offsets leave room for the label one past each window's end.
    last_offset = tokens.numel() - seq - 1
    while True:
        offsets = torch.randint(0, last_offset + 1, (batch, 1), generator=generator)
        index = (offsets + window).to(tokens.device)
        yield tokens[index], tokens[index + 1]
