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


def load_tokens(path: str, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """Token ids from `path` as a 1-D long tensor, checked against the model's vocabulary:
    - a ``.bin`` file: token ids, little-endian uint16 when the vocabulary fits 16 bits, else uint32;
    - a Hugging Face datasets directory (``datasets.save_to_disk``; of a DatasetDict, its train split): its
      ``input_ids`` column, or its ``text`` column through ``tokenizer`` (each text then ends with its EOS);
    - a text file or a directory of ``*.txt`` files (sorted): through ``tokenizer``, or as bytes when
      there is none (byte-level vocabularies).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"--data={path!r} does not exist; expected a .bin of token ids, a text file, "
                                f"a directory of .txt files or a saved Hugging Face dataset")
    if source.is_file() and source.suffix == ".bin":
        dtype = torch.uint16 if vocab_size <= 1 << 16 else torch.uint32
        raw = source.read_bytes()
        if len(raw) % dtype.itemsize:
            raise ValueError(f"--data={path!r} has {len(raw)} bytes, not a whole number of {dtype} token ids")
        tokens = torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.long)
    elif source.is_dir() and any((source / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        tokens = _dataset_tokens(source, tokenizer)
    else:
        files = sorted(source.rglob("*.txt")) if source.is_dir() else [source]
        if not files:
            raise ValueError(f"--data={path!r} is a directory without .txt files or a saved dataset")
        text = "\n".join(f.read_text(errors="replace") for f in files)
        tokens = load_tokens_of_text(text, vocab_size, tokenizer, path)
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(f"--data={path!r} holds token id {int(tokens.max())}, past the model's vocabulary of "
                         f"{vocab_size}" + (" (a .bin is read as uint16 for vocabularies up to 65536)"
                                            if source.suffix == ".bin" else ""))
    return tokens


def load_tokens_of_text(text: str, vocab_size: int, tokenizer, path: str) -> torch.Tensor:
    """`text` through `tokenizer`, or as bytes when there is none."""
    if tokenizer is not None:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if vocab_size < 256:
        raise ValueError(f"{path} is text, and the model has no tokenizer and a vocabulary of {vocab_size} (bytes "
                         f"need 256); give --data a .bin of token ids")
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(torch.long)


def _dataset_tokens(source: Path, tokenizer) -> torch.Tensor:
    try:
        import datasets
        import numpy
        import pyarrow.compute
    except ImportError:
        raise ImportError(f"--data={str(source)!r} is a saved Hugging Face dataset; reading it needs "
                          f"`pip install datasets`") from None
    dataset = datasets.load_from_disk(str(source))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"--data={str(source)!r} is a dataset with the splits {sorted(dataset)} and no train "
                             f"split; give one split's directory")
        dataset = dataset["train"]
    # Through Arrow a batch of rows at a time: a billion token ids never become Python ints.
    batches = dataset.with_format("arrow").iter(batch_size=1 << 14)
    if "input_ids" in dataset.column_names:
        pieces = [pyarrow.compute.list_flatten(batch["input_ids"]).to_numpy() for batch in batches]
    elif "text" in dataset.column_names and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
        end = [eos] if eos is not None else []  # each document ends with the tokenizer's end-of-sequence token
        pieces = [numpy.array([t for ids in tokenizer(batch["text"].to_pylist())["input_ids"] for t in ids + end])
                  for batch in batches]
    else:
        raise ValueError(f"--data={str(source)!r} has columns {dataset.column_names}; expected input_ids, or text "
                         f"with a model directory that holds a tokenizer")
    return torch.from_numpy(numpy.concatenate(pieces) if pieces else numpy.zeros(0)).to(torch.long)
