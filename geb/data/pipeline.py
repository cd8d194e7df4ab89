"""The data pipeline: raw files → cleaned, filtered, deduplicated text → packed token shards, with a report.

Two phases, so a tokenizer can be trained on the cleaned text before packing:

    report = run_pipeline("raw/", "out/")                      # → out/text/ (JSONL.gz shards + meta.json)
    tok = Tokenizer.train(iter_text("out/text"), vocab_size)   # any tokenizer training
    pack_text("out/text", tok_dir, "out/tokens")               # → out/tokens/ (geb-tokens-v1)

or in one go with `run_pipeline(..., tokenizer_dir=TOK)`. Stages run as datatrove pipelines, each in
its own executor with a logging folder under out/work/logs/<stage>/ whose completion markers make a
re-run resume where it stopped:

  clean            read → rule cleaning → quality filters → out/work/clean/ → MinHash signatures
  minhash_*        LSH buckets (several per task) → clusters → filter → out/work/minhash/out/ → paragraph hashes
  para_dedup_*     find repeated paragraphs → drop them → out/work/para_dedup/out/ → 3-sentence-span hashes
  sent_dedup_*     find repeated spans → drop them → out/work/sent_dedup/out/

Each signature step runs at the end of the stage that wrote its input (the documents pass on from
the writer), so no stage re-reads a folder only to hash it.

The last stage's files are then published to out/text/ (temp folder + rename, meta.json inside), and
report.md/report.json/report.png are written (report.py). Locally stages run on datatrove's
LocalPipelineExecutor with N worker processes; `build_stages` gives the same stages for its Slurm or
Ray executors (docs/data.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from geb.data import settings as S
from geb.common import AtomicFolder, atomic_write_json, check_destination
from geb.data.metering import Meter, Timed
from geb.errors import GebError

TEXT_FORMAT = "geb-text-v1"


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int
    output: str | None = None  # the folder of documents this stage writes, when it writes documents


class Layout:
    """Where everything goes inside the output folder."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.work = self.out / "work"
        self.stats = self.work / "stats"
        self.rejects = self.work / "rejects"
        self.removed = self.work / "removed"
        self.logs = self.work / "logs"
        self.text = self.out / "text"
        self.tokens = self.out / "tokens"


def _doc_dict(writer, doc) -> dict:
    """The record datatrove's default adapter writes (its non-empty fields text, id, metadata), without
    its dataclasses.asdict deep copy of every document, which cost more than some cleaning rules."""
    if doc.media:
        return writer._default_adapter(doc)
    return {k: v for k, v in (("text", doc.text), ("id", doc.id), ("metadata", doc.metadata)) if v}


def _writer(folder: Path, compress: bool = False):
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    # intermediate shards are read once more and deleted with work/: gzip would cost more than it saves
    if compress:
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz", compression="gzip", adapter=_doc_dict)
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=_doc_dict)


def _reader(folder: Path):
    from geb.data.dedup import RankReader

    # rank-bound: the filter must see the documents the signature step numbered, in that order.
    # add_file_path=False: the intermediate file's absolute path must not leak into the published text
    return RankReader(str(folder), glob_pattern="*.jsonl", recursive=False, add_file_path=False,
                      compression=None)


def minhash_hash_config() -> dict:
    """The shingle hash of the dedup stages (bench/near_dup.py measures with the same one)."""
    # sha1, not datatrove's default xxhash: xxhash ≥ 4 no longer hashes str, which datatrove passes it
    return {"precision": 64, "hash_fc": "sha1"}


def _timed(step, label: str, L: Layout):
    """Every step not a GEB rule is timed by a wrapper, for the report."""
    return Timed(step, label, L.stats)


def _add_signatures(stages: list[Stage], step, label: str, L: Layout) -> None:
    """A signature step reads what the stage before wrote: it runs at the end of that stage (the
    documents pass on from its writer), which saves a stage and a pass over the files."""
    stages[-1].pipeline.append(_timed(step, label, L))


def _clean_stage(input_dir, files: list[str], settings: dict, L: Layout, tasks: int) -> Stage:
    """Read, run every enabled cleaning rule and quality filter in order, write work/clean/."""
    from geb.data.readers import GebReader

    rules = settings["rules"]
    steps = [_timed(GebReader(input_dir, files, L.rejects, L.stats, **settings["read"]), "read", L)]
    for name, cls in S.rule_classes().items():
        if rules[name]["enabled"]:
            params = {k: v for k, v in rules[name].items() if k != "enabled"}
            steps.append(cls(L.stats, **params))
    clean_out = L.work / "clean"
    return Stage("clean", [*steps, _timed(_writer(clean_out), "write clean", L)], tasks, str(clean_out))


def _add_minhash(stages: list[Stage], prev: Path, mh: dict, hashing, L: Layout, tasks: int, output_dir) -> Path:
    """MinHash near-duplicate removal: signatures (at the end of the previous stage), buckets, clusters,
    then a filter over `prev`; returns the folder the filter writes."""
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter)

    from geb.data.minhash import FastMinhashSignature, GroupedBuckets
    from geb.data.text import BilingualWordTokenizer

    cfg = MinhashConfig(n_grams=int(mh["n_grams"]), num_buckets=int(mh["num_buckets"]),
                        hashes_per_bucket=int(mh["hashes_per_bucket"]), seed=int(mh["seed"]),
                        hash_config=hashing)
    base = L.work / "minhash"
    index_dir = mh["index_dir"] or None
    index_name = (mh["index_name"] or Path(output_dir).resolve().name) if index_dir else None
    out = base / "out"
    _add_signatures(stages, FastMinhashSignature(str(base / "sigs"), cfg, language=BilingualWordTokenizer(mh["unit"])),
                    "minhash signatures", L)
    buckets = MinhashDedupBuckets(str(base / "sigs"), str(base / "buckets"), index_folder=index_dir, config=cfg,
                                  only_dedup_in_index=False, create_index_name=index_name)
    stages += [
        # several buckets per task: a task's fixed cost is paid `tasks` times, not num_buckets times
        Stage("minhash_buckets", [_timed(GroupedBuckets(buckets), "minhash buckets", L)], min(cfg.num_buckets, tasks)),
        Stage("minhash_cluster", [_timed(MinhashDedupCluster(str(base / "buckets"), str(base / "remove"), cfg),
                                         "minhash cluster", L)], 1),
        Stage("minhash_filter", [_timed(_reader(prev), "read minhash_filter", L), Meter("minhash", "in", L.stats),
                                 _timed(MinhashDedupFilter(str(base / "remove"), exclusion_writer=_writer(L.removed / "minhash", True)),
                                        "minhash filter", L),
                                 Meter("minhash", "out", L.stats), _timed(_writer(out), "write minhash", L)], tasks, str(out)),
    ]
    return out


def _add_span_dedup(stages: list[Stage], prev: Path, name: str, cfg, L: Layout, tasks: int) -> Path:
    """Paragraph or sentence-span dedup (datatrove's sentence dedup under `cfg`): signatures (at the end
    of the previous stage), a search for duplicates, then a filter over `prev`; returns its output folder."""
    from datatrove.pipeline.dedup.sentence_dedup import SentenceDedupFilter, SentenceFindDedups

    from geb.data.dedup import SpanSignature
    from geb.data.text import BilingualWordTokenizer

    tok = BilingualWordTokenizer()
    base = L.work / name
    out = base / "out"
    _add_signatures(stages, SpanSignature(str(base / "sigs"), config=cfg, language=tok), f"{name} signatures", L)
    stages += [
        Stage(f"{name}_find", [_timed(SentenceFindDedups(str(base / "sigs"), str(base / "dups"), config=cfg),
                                      f"{name} find", L)], 1),
        Stage(f"{name}_filter", [_timed(_reader(prev), f"read {name}_filter", L), Meter(name, "in", L.stats),
                                 _timed(SentenceDedupFilter(str(base / "dups"), config=cfg, language=tok,
                                                            exclusion_writer=_writer(L.removed / name, True)), f"{name} filter", L),
                                 Meter(name, "out", L.stats), _timed(_writer(out), f"write {name}", L)], tasks, str(out)),
    ]
    return out


def build_stages(input_dir: str | Path, output_dir: str | Path, settings: dict, files: list[str],
                 tasks: int | None = None) -> list[Stage]:
    """The pipeline's datatrove stages, in order, for any executor: clean, then each enabled dedup.

    `tasks` (default: one per input file, at most 4) is the number of shards every per-document stage
    splits the data into; a re-run resumes at task granularity. datatrove sets up logging per task
    (~60 ms here), so many tiny tasks cost more than they save."""
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig
    from datatrove.utils.hashing import HashConfig

    L = Layout(output_dir)
    rules = settings["rules"]
    tasks = max(1, min(len(files), tasks or 4))
    stages = [_clean_stage(input_dir, files, settings, L, tasks)]
    prev = L.work / "clean"
    hashing = HashConfig(**minhash_hash_config())
    if rules["minhash"]["enabled"]:
        prev = _add_minhash(stages, prev, rules["minhash"], hashing, L, tasks, output_dir)
    min_units = int(rules["length"]["min_units"]) if rules["length"]["enabled"] else 0
    for name, split, n in (("para_dedup", False, 1), ("sent_dedup", True, int(rules["sent_dedup"]["n_sentences"]))):
        r = rules[name]
        if r["enabled"]:
            cfg = SentDedupConfig(n_sentences=n, split_sentences=split, only_dedup_in_index=False,
                                  min_doc_words=min_units, min_num_sentences=0,
                                  min_words_to_remove_span=int(r["min_units"]), hash_config=hashing)
            prev = _add_span_dedup(stages, prev, name, cfg, L, tasks)
    return stages


@contextlib.contextmanager
def _stderr_to(path: Path | None):
    """datatrove logs every task at INFO to stderr; send fd 2 (children inherit it) to a log file."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_stages(stages: list[Stage], logs: Path, workers: int = 1, quiet: bool = True, progress=None) -> dict:
    """Run stages in order on datatrove's LocalPipelineExecutor; returns seconds per stage."""
    from datatrove.executor.local import LocalPipelineExecutor

    times = {}
    # fork (Linux): worker processes inherit the imported modules and jieba's loaded dictionary
    # instead of re-importing them in every pool of every stage (forkserver, datatrove's default)
    method = "fork" if sys.platform == "linux" else "forkserver"
    if workers > 1 and any(getattr(s, "rule", "") in ("stopwords", "repetition") for st in stages for s in st.pipeline):
        from geb.data.text import _segmenter

        with contextlib.suppress(ImportError):
            _segmenter()
    if workers > 1:  # the same for the signature steps' mark table and native core (each pool of each stage)
        from geb.data.minhash import _core_functions
        from geb.data.text import _marks

        _marks()
        _core_functions()
    for st in stages:
        t0 = time.perf_counter()
        ex = LocalPipelineExecutor(st.pipeline, tasks=st.tasks, workers=max(1, min(workers, st.tasks)),
                                   logging_dir=str(logs / st.name), start_method=method)
        if progress:
            progress(f"stage {st.name}: {st.tasks} task(s)")
        with _stderr_to(logs / "datatrove.log" if quiet else None):
            ex.run()
        times[st.name] = time.perf_counter() - t0
        if st.output and not any(f.stat().st_size for f in Path(st.output).glob("*.jsonl")):
            # nothing left to deduplicate: datatrove's readers would fail on the empty folder
            if progress:
                progress(f"stage {st.name} kept no document; the later stages are skipped")
            break
    return times


def input_fingerprint(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(root / rel, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def _publish_text(src: Path, L: Layout, meta: dict) -> dict:
    """Copy the last stage's shards into out/text/ atomically, with meta.json (docs, chars, hash)."""
    import gzip

    import orjson

    files = sorted(src.glob("*.jsonl")) if src.is_dir() else []
    docs = chars = 0
    h = hashlib.sha256()
    with AtomicFolder(L.text) as tmp:
        names = []
        for i, f in enumerate(files):
            name = f"text_{i:05d}.jsonl.gz"
            with open(f, "rb") as g, gzip.open(tmp / name, "wb", compresslevel=6) as out:
                for line in g:
                    docs += 1
                    chars += len(orjson.loads(line)["text"])
                    h.update(line)
                    out.write(line)
            names.append(name)
        meta = {"format": TEXT_FORMAT, "files": names, "documents": docs, "chars": chars,
                "data_hash": h.hexdigest()[:16], **meta}
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def iter_text(text_dir: str | Path):
    """Yield the cleaned documents' text from a published out/text/ folder (e.g. to train a tokenizer)."""
    for _, text in iter_docs(text_dir):
        yield text


def iter_docs(text_dir: str | Path):
    """Yield (id, text) from a published out/text/ folder."""
    import gzip

    import orjson

    folder = Path(text_dir)
    mf = folder / "meta.json"
    if not mf.is_file():
        raise GebError(f"{folder}: not a cleaned-text folder (meta.json missing; run `geb data run` first)")
    meta = json.loads(mf.read_text())
    if meta.get("format") != TEXT_FORMAT:
        raise GebError(f"{mf}: unknown format {meta.get('format')!r} (expected {TEXT_FORMAT})")
    for name in meta["files"]:
        with gzip.open(folder / name, "rb") as f:
            for line in f:
                d = orjson.loads(line)
                yield d["id"], d["text"]


@dataclass
class Run:
    root: Path
    layout: Layout
    settings: dict
    files: list[str]
    tasks: int
    fingerprint: str
    stages: list[Stage]


def prepare_run(input_dir: str | Path, output_dir: str | Path, overrides: dict | None = None,
                restart: bool = False, tasks: int | None = None, workers: int = 1) -> Run:
    """Resolve settings, list inputs, check or start the run record in out/work/run.json, build stages."""
    from geb.data.readers import list_inputs

    root = Path(input_dir)
    if not root.is_dir():
        raise GebError(f"{root}: input folder not found")
    settings = S.resolve(overrides)
    L = Layout(output_dir)
    if L.out.resolve() == root.resolve() or root.resolve() in L.out.resolve().parents:
        raise GebError(f"{L.out}: the output folder must not be inside the input folder {root}")
    check_destination(L.out, "data")
    files = [str(p.relative_to(root)) for p in list_inputs(root)]
    fingerprint = input_fingerprint(root, files)
    tasks = max(1, min(len(files), tasks or max(4, workers)))
    run_id = {"input": str(root.resolve()), "input_hash": fingerprint, "settings": settings, "tasks": tasks}
    run_file = L.work / "run.json"
    if run_file.is_file() and json.loads(run_file.read_text()) != run_id:
        if not restart:
            raise GebError(f"{L.out} holds a run with other inputs or settings; use --restart (restart=True) "
                           "to start over, or another output folder")
    if restart:
        for p in (L.work, L.text, L.tokens):
            shutil.rmtree(p, ignore_errors=True)
    L.work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, run_id)
    stages = build_stages(root, L.out, settings, files, tasks) if files else []
    return Run(root, L, settings, files, tasks, fingerprint, stages)


def run_pipeline(input_dir: str | Path, output_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 workers: int = 1, overrides: dict | None = None, restart: bool = False, quiet: bool = True,
                 progress=None, tasks: int | None = None) -> dict:
    """Clean, filter and deduplicate every file under input_dir; publish out/text/; pack when given a tokenizer.

    Returns the report dict (also written as report.json/report.md/report.png in output_dir). Running
    it again with the same inputs and settings resumes (finished tasks are skipped; after a Slurm run,
    everything is finished and this only publishes and reports); with different inputs or settings it
    refuses unless restart=True, which starts over.
    """
    from geb.data.report import build_report

    run = prepare_run(input_dir, output_dir, overrides, restart, tasks, workers)
    L, settings = run.layout, run.settings
    t0 = time.perf_counter()
    times = run_stages(run.stages, L.logs, workers=workers, quiet=quiet, progress=progress) if run.stages else {}
    last = Path(next(st.output for st in reversed(run.stages) if st.output)) if run.stages else L.work / "empty"
    text_meta = _publish_text(last, L, {"parent": str(run.root.resolve()), "input_hash": run.fingerprint})
    elapsed = time.perf_counter() - t0
    config = {"stage": "data", "parent": str(run.root.resolve()), "input_hash": run.fingerprint,
              "files": len(run.files), "settings": settings, "tasks": run.tasks, "workers": workers,
              "text_hash": text_meta["data_hash"]}
    packed = None
    if tokenizer_dir is not None and text_meta["documents"] > 0:
        packed = pack_text(L.text, tokenizer_dir, L.tokens, val_fraction=float(settings["val_fraction"]),
                           seed=int(settings["seed"]))
        config["tokens_hash"] = packed["data_hash"]
    atomic_write_json(L.out / "config.json", config)
    return build_report(L, settings, run.files, run.stages, times, elapsed, text_meta, packed)


def slurm_executors(run: Run, **slurm_kwargs) -> list:
    """The run's stages as chained datatrove SlurmPipelineExecutors (each depends on the one before).

    slurm_kwargs go to every executor (time, partition, cpus_per_task, mem_per_cpu_gb, venv_path, ...);
    the logging folders are the local ones, so a later local `run_pipeline` with the same arguments sees
    every task finished and only publishes out/text, packs and reports.
    """
    from datatrove.executor.slurm import SlurmPipelineExecutor

    kw = {"time": "12:00:00", "partition": "cpu", **slurm_kwargs}
    execs, prev = [], None
    for st in run.stages:
        ex = SlurmPipelineExecutor(st.pipeline, tasks=st.tasks, logging_dir=str(run.layout.logs / st.name),
                                   job_name=f"geb-data-{st.name}", depends=prev, **kw)
        execs.append(ex)
        prev = ex
    return execs


def run_ray(input_dir: str | Path, output_dir: str | Path, overrides: dict | None = None, restart: bool = False,
            tasks: int | None = None, mem_per_cpu_gb: float = 1.0, **ray_kwargs) -> Run:
    """Run every stage on the Ray cluster `ray.init()` connected to, one datatrove RayPipelineExecutor per
    stage, in order, with the local logging folders; then `run_pipeline` with the same arguments
    publishes out/text, packs and reports (every task is already complete)."""
    from datatrove.executor.ray import RayPipelineExecutor

    run = prepare_run(input_dir, output_dir, overrides, restart, tasks)
    for st in run.stages:
        RayPipelineExecutor(st.pipeline, tasks=st.tasks, logging_dir=str(run.layout.logs / st.name),
                            mem_per_cpu_gb=mem_per_cpu_gb, **ray_kwargs).run()
    return run


def submit_slurm(input_dir: str | Path, output_dir: str | Path, overrides: dict | None = None,
                 restart: bool = False, tasks: int | None = None, **slurm_kwargs) -> list:
    """Submit every stage to Slurm (sbatch) as dependent array jobs; returns the executors."""
    run = prepare_run(input_dir, output_dir, overrides, restart, tasks)
    if not run.stages:
        raise GebError(f"{input_dir}: no input files")
    execs = slurm_executors(run, **slurm_kwargs)
    execs[-1].run()  # launches its dependencies first
    return execs


def _val_score(doc_id: str, seed: int) -> float:
    d = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


def pack_text(text_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, val_fraction: float = 0.01,
              seed: int = 0, shard_tokens: int = 1 << 26, val_texts: list[str] | None = None,
              extra_train_texts: list[str] | None = None) -> dict:
    """Tokenize a cleaned-text folder into geb-tokens-v1 shards (EOS after each document).

    A document goes to validation when a hash of its id (and seed) falls below val_fraction, so the
    split is stable as data is added; when that picks none and there are ≥ 2 documents, the one with the
    lowest hash goes. With `val_texts` (a held-out set of your own) every cleaned document is training
    data and those texts are the "val" split. The folder is written under a temporary name and renamed
    when complete.
    A single writer in one process: TokenWriter is sequential and datatrove's tokenizer step writes
    its own format, not the one `geb pretrain` reads.
    """
    from geb.data.tokens import TokenWriter
    from geb.tokenizer import Tokenizer

    text_dir, out_dir = Path(text_dir), Path(out_dir)
    tok = Tokenizer.load(tokenizer_dir)
    text_meta = json.loads((text_dir / "meta.json").read_text()) if (text_dir / "meta.json").is_file() else {}
    val_hash = (hashlib.sha256("\0".join(val_texts).encode()).hexdigest()[:16] if val_texts is not None else None)
    extra_hash = (hashlib.sha256("\0".join(extra_train_texts).encode()).hexdigest()[:16]
                  if extra_train_texts else None)
    want = {"extra_train_texts_hash": extra_hash, "parent": str(text_dir.resolve()), "text_hash": text_meta.get("data_hash"),
            "tokenizer_hash": tok.hash(), "val_fraction": None if val_texts is not None else val_fraction,
            "seed": seed, "val_texts_hash": val_hash}
    mf = out_dir / "meta.json"
    if mf.is_file():
        old = json.loads(mf.read_text())
        if all(old.get(k) == v for k, v in want.items()):
            return old  # already packed from the same text with the same tokenizer and split
    scores = [(_val_score(i, seed), i) for i, _ in iter_docs(text_dir)]
    if not scores:
        raise GebError(f"{text_dir}: no documents to pack")
    val = {i for s, i in scores if s < val_fraction} if val_texts is None else set()
    if val_texts is None and not val and val_fraction > 0 and len(scores) >= 2:
        val = {min(scores)[1]}
    with AtomicFolder(out_dir, kind="tokens") as tmp:
        w = TokenWriter(tmp, vocab_size=tok.vocab_size, eos_id=tok.doc_id, shard_tokens=shard_tokens,
                        extra_meta={"stage": "data-pack", **want, "tokenizer": str(Path(tokenizer_dir).resolve())})
        for doc_id, text in iter_docs(text_dir):
            # raw text may contain "<|endoftext|>" literally: it is text here, never a control token
            w.add(tok.encode(text, allow_special=False), "val" if doc_id in val else "train")
        for text in val_texts or []:
            w.add(tok.encode(text, allow_special=False), "val")
        # already-clean text that must not pass the cleaning rules (e.g. formatted exercises)
        for text in extra_train_texts or []:
            w.add(tok.encode(text, allow_special=False), "train")
        meta = w.close()
    return meta
