"""Attribute a data set of prompts: JSONL in, JSONL or Parquet out, resumable, sharded.

    llama-attrib-dataset prompts.jsonl out.jsonl [--model M] [--max-new-tokens N] [--chat]
    accelerate launch --multi_gpu --num_processes 2 -m llama_attrib.dataset prompts.jsonl out.parquet

Each input line is ``{"id": ..., "prompt": "text"}`` or ``{"id": ..., "messages": [...]}``
(``id`` defaults to the line number). Each process works on the lines ``i`` with
``i % world == rank`` and appends one finished row at a time to its own part file
(``OUT.parts/rank-R.jsonl``, flushed and fsynced), so an interruption loses at most the row in
progress: running the same command again skips every finished row (from every part file,
so the number of processes may change between runs) and cuts a half-written last line. When
every process is done, rank 0 merges the parts in input order into ``OUT`` (``.jsonl``: one
saved :class:`~llama_attrib.Attribution` per line with its ``id``; ``.parquet``: one row per
prompt, columns ``id, prompt, generation, tokens, token_ids, prompt_length, token_scores,
logits, ranking, record`` where ``ranking`` is the answer's sources as JSON (with ``--by
sentence`` or ``paragraph``; null otherwise) and ``record`` the full JSON). Ranks come from
``torch.distributed`` (initialised on gloo from ``accelerate launch --multi_gpu`` /
``torchrun``'s environment: also on a machine without GPUs, where every process runs on the
CPU; with GPUs, process ``r`` uses ``cuda:LOCAL_RANK``) or ``--rank`` / ``--world`` (then merge
with ``--merge`` once every shard is done).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attribution import attribute
from .errors import require
from .models import add_arguments, from_arguments
from .result import Attribution


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The input rows, each with an ``id`` (the line number when absent) and a prompt."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(
                    f"{path}:{number + 1}: each line needs exactly one of 'prompt' or 'messages'"
                )
            row.setdefault("id", number)
            rows.append(row)
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids are not unique")
    return rows


def parts_folder(output: str | Path) -> Path:
    return Path(str(output) + ".parts")


def _complete_lines(path: Path, repair: bool = False) -> Iterator[dict[str, Any]]:
    """The finished rows of a part file. ``repair``: cut a half-written last line (a crash's)
    off the file, which only the file's own rank may do: another rank's may be mid-write."""
    if not path.exists():
        return
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            break
        good += len(raw)
        yield row
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)


def finished(output: str | Path, repair: int | None = None) -> dict[str, dict[str, Any]]:
    """Every finished row of every part file, by id. ``repair``: the rank whose own part file
    loses a half-written last line; every other file is only read."""
    done: dict[str, dict[str, Any]] = {}
    folder = parts_folder(output)
    if folder.is_dir():
        for part in sorted(folder.glob("rank-*.jsonl")):
            for row in _complete_lines(part, repair=part.name == f"rank-{repair}.jsonl"):
                done[str(row["id"])] = row
    return done


def attribute_dataset(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    output: str | Path,
    *,
    rank: int = 0,
    world: int = 1,
    max_new_tokens: int = 8,
    chat: bool | None = None,
    progress: bool = False,
    by: str = "token",
    batch_size: int = 1,
    verify: int = 0,
    **generate_kwargs: Any,
) -> int:
    """Attribute this rank's share of ``rows``, appending to its part file; returns rows done now.

    ``by``: ``"sentence"`` or ``"paragraph"`` groups the sources by the sentences of the prompt
    (of the last user message of a chat) and adds ``"ranking"`` to each record: the sources of
    the whole answer, largest first (``label``, ``score``, ``share``). ``batch_size``: prompts
    generated and decomposed together (:func:`attribute`); each row is written once its batch
    is done, so an interruption loses at most one batch. ``verify``: with ``by``, the ranking's
    ``verify`` first sources re-ranked by the measured drop of the answer's log-probability
    without each (:mod:`llama_attrib.verify`), in ``"citations"`` with ``"together"``."""
    if verify and by == "token":
        raise ValueError("verify ranks the answer's sentences or paragraphs: give by='sentence' too")
    folder = parts_folder(output)
    folder.mkdir(parents=True, exist_ok=True)
    done = set(finished(output, repair=rank))
    mine = [r for i, r in enumerate(rows) if i % world == rank and str(r["id"]) not in done]
    bar = _bar(progress, len(mine))
    count = 0
    with open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8") as f:
        for start in range(0, len(mine), max(1, batch_size)):
            batch = mine[start : start + max(1, batch_size)]
            prompts = [row.get("messages", row.get("prompt")) for row in batch]
            if len(batch) == 1:
                results = [
                    attribute(model, tokenizer, prompts[0], max_new_tokens, chat=chat, **generate_kwargs)
                ]
            else:
                results = attribute(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens,
                    chat=chat,
                    batch_size=len(batch),
                    **generate_kwargs,
                )
            for row, prompt, result in zip(batch, prompts, results, strict=True):
                record = {"id": row["id"], **_sources(result, prompt, by, verify, model)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                count += 1
                bar.update(1)
    bar.close()
    return count


def _sources(result: Attribution, prompt: Any, by: str, verify: int = 0, model: Any = None) -> dict[str, Any]:
    """The record of one row: the result grouped ``by`` its sources, with the answer's ranking."""
    if by == "token":
        return result.to_dict()
    within = None
    if isinstance(prompt, list):  # a chat: the sentences of its last user message
        users = [
            m["content"] for m in prompt if m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
        if users and users[-1].strip():
            within = result.message(users[-1])
    view = result.by(by, within)
    ranking = [{"label": label, "score": score, "share": share} for label, score, share in view.ranking()]
    outside = view.outside()  # what lies outside the sentences: reported apart, not ranked
    apart = {"label": outside[0], "score": outside[1], "share": outside[2]} if outside else None
    record = {**view.to_dict(), "ranking": ranking, "outside": apart}
    if verify:  # evidence: the measured drop of the answer's log-probability without each source
        cited = view.ranking(verify=verify, model=model)
        record["citations"] = [c._asdict() | {"supported": c.supported} for c in cited]
        record["together"] = cited.together
    return record


def merge(rows: Sequence[Mapping[str, Any]], output: str | Path) -> Path:
    """Write every finished row in input order to ``output`` (``.jsonl`` or ``.parquet``), as a
    whole: into a file beside the parts, then renamed over ``output`` (a merge that is killed
    leaves the previous output as it was)."""
    done = finished(output)
    missing = [r["id"] for r in rows if str(r["id"]) not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} rows are not finished yet (first: {missing[0]!r}); run again")
    records = [done[str(r["id"])] for r in rows]
    path = Path(output)
    writing = parts_folder(output) / "merging.tmp"  # same file system: the rename is atomic
    writing.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        require("pyarrow", "dataset", "writing Parquet")
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([_flat(r, rows[i]) for i, r in enumerate(records)])
        pq.write_table(table, writing)
    else:
        with open(writing, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(writing, "rb") as f:
        os.fsync(f.fileno())
    os.replace(writing, path)
    return path


def _flat(record: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    result = Attribution.from_dict(record)
    return {
        "id": str(record["id"]),
        "prompt": json.dumps(row.get("messages", row.get("prompt")), ensure_ascii=False),
        "generation": result.generation,
        "tokens": list(record["tokens"]),
        "token_ids": list(record["token_ids"]),
        "prompt_length": int(record["prompt_length"]),
        "token_scores": record["token_scores"],
        "logits": record["logits"],
        "ranking": json.dumps(record.get("ranking"), ensure_ascii=False),
        "record": json.dumps(record, ensure_ascii=False),
    }


def load_results(path: str | Path) -> dict[str, Attribution]:
    """The merged output (JSONL or Parquet) back as Attributions, by id."""
    path = Path(path)
    if path.suffix == ".parquet":
        require("pyarrow", "dataset", "reading Parquet")
        import pyarrow.parquet as pq

        records = [
            json.loads(r) for r in pq.read_table(path, columns=["record"]).column("record").to_pylist()
        ]
    else:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {str(r["id"]): Attribution.from_dict(r) for r in records}


def _bar(progress: bool, total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", desc="llama_attrib", disable=not progress)


def _distributed(rank: int | None, world: int | None) -> tuple[int, int, Any]:
    """``(rank, world, torch.distributed or None)``: from the arguments, else the launcher's env."""
    if rank is not None and world is not None:
        return rank, world, None
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llama-attrib-dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="JSONL of {'id', 'prompt' | 'messages'}")
    p.add_argument("output", help="out.jsonl or out.parquet (parts go to OUTPUT.parts/)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--chat", action="store_true", help="apply the chat template to text prompts")
    p.add_argument(
        "--by",
        choices=["token", "sentence", "paragraph"],
        default="token",
        help="group the sources by the prompt's sentences or paragraphs (adds each answer's ranking)",
    )
    p.add_argument("--rank", type=int, help="this process's shard (default: from torch.distributed)")
    p.add_argument("--world", type=int, help="number of shards (default: from torch.distributed)")
    p.add_argument("--merge", action="store_true", help="only merge finished parts into OUTPUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--batch-size", type=int, default=1, help="prompts generated and decomposed together")
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="M",
        help="with --by sentence: measure the answer without each of the M first sources (adds citations)",
    )
    add_arguments(p, device="auto")
    args = p.parse_args(argv)

    rows = read_prompts(args.input)
    if args.merge:
        print(f"wrote {merge(rows, args.output)}", flush=True)
        return 0
    rank, world, dist = _distributed(args.rank, args.world)
    if args.device == "auto" and not args.device_map and torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    model, tokenizer, options = from_arguments(args)
    count = attribute_dataset(
        model,
        tokenizer,
        rows,
        args.output,
        rank=rank,
        world=world,
        max_new_tokens=args.max_new_tokens,
        chat=True if args.chat else None,
        progress=not args.no_progress,
        by=args.by,
        batch_size=args.batch_size,
        verify=args.verify,
        **options,
    )
    print(f"rank {rank}/{world}: {count} prompts attributed", flush=True)
    if dist is not None:
        dist.barrier()
    if rank == 0 and (dist is not None or args.world in (None, 1)):
        print(f"wrote {merge(rows, args.output)}", flush=True)
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
