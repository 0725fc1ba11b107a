"""``maevit embed SRC --model MODEL --out FILE``: features of every image of a data source (and ``maevit knn``).

``maevit knn BANK QUERY`` scores two such files.

Any source the toolkit reads (shards, folders, ``sample:val``, ...) is read once in
order with the evaluation transform (resize + center crop, the model's mean / std),
through any encoder family (a run directory, a weights file or a model folder).
Features are the pooled pre-logit features (what the online kNN probe and the linear
probe use) or, with ``--tokens``, the last feature map ``[h, w, D]``.

Large sets: features are written every ``--part-size`` images to ``OUT.parts/`` (each
part atomically); a rerun of the same command skips the parts already written and
goes on from the next batch without decoding the ones before, then joins the parts
into OUT and removes the folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

PART_PREFIX, MANIFEST = "part-", "manifest.json"


def main(argv: list[str] | None = None) -> int:
    """``maevit embed SRC --model MODEL --out FILE [--tokens] [--batch-size B] [--part-size N]``."""
    from maevit.config import Range, ranged

    parser = argparse.ArgumentParser(prog="maevit embed", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="images: shards, a folder, a class-per-folder tree, 'sample:val', ...")
    parser.add_argument("--model", required=True, help="run directory, weights file or model folder")
    parser.add_argument("--out", required=True, help="output .safetensors (or .npy)")
    parser.add_argument("--tokens", action="store_true", help="the patch grid [N, h, w, D] instead of pooled [N, D]")
    parser.add_argument("--batch-size", type=ranged(int, Range(1)), default=64)
    parser.add_argument("--part-size", type=ranged(int, Range(1)), default=50_000,
                        help="images per part in OUT.parts/ (rounded to whole batches; what a rerun keeps)")
    parser.add_argument("--num-workers", type=ranged(int, Range(0)), default=2, help="loader processes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.out.endswith((".safetensors", ".npy")):
        parser.error(f"--out must end in .safetensors or .npy, got {args.out!r}")

    from maevit.embeddings import EmbeddingFileError
    from maevit.train.command import setup_logging, usage_errors

    setup_logging()
    try:
        return _embed(args)
    except (*usage_errors(), EmbeddingFileError, ValueError) as e:
        print(f"maevit embed: error: {e}", file=sys.stderr)
        return 2


def _embed(args: argparse.Namespace) -> int:
    import torch

    from maevit.data.stream import eval_loader
    from maevit.embeddings import Embeddings, concat, read_embeddings, write_embeddings
    from maevit.export import preprocessing_of
    from maevit.models import create_classifier
    from maevit.models.weights import find_weights_file
    from maevit.train.knn import encoder_features, patch_features
    from maevit.train.progress import progress_bar

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = create_classifier(None, 0, pretrained=args.model, global_pool=None).eval().to(device)
    prep = preprocessing_of(args.model)
    loader = eval_loader(args.src, img_size=encoder.img_size, batch_size=args.batch_size, num_workers=args.num_workers,
                         mean=prep["mean"], std=prep["std"], interpolation=prep["interpolation"],
                         crop_pct=prep["crop_pct"])
    part_batches = max(1, args.part_size // args.batch_size)
    manifest = {"source": args.src, "model": str(find_weights_file(args.model).resolve()), "tokens": args.tokens,
                "batch_size": args.batch_size, "part_batches": part_batches, "num_samples": loader.num_samples,
                "num_workers": args.num_workers,  # which samples a part holds depends on it (StreamLoader.records)
                "img_size": list(encoder.img_size), "mean": list(prep["mean"]), "std": list(prep["std"])}
    parts_dir = Path(args.out + ".parts")
    done = _finished_parts(parts_dir, manifest)
    meta = {"model": args.model, "model_name": encoder.model_name, "source": args.src,
            "pooling": "tokens" if args.tokens else "pooled", "img_size": list(encoder.img_size)}
    features = patch_features if args.tokens else encoder_features
    n_parts = -(-len(loader) // part_batches)  # ceil
    if done:
        print(f"resuming: {done} of {n_parts} parts already in {parts_dir}", file=sys.stderr)
    loader.skip_batches(done * part_batches)
    start = done * part_batches  # batches already embedded: skipped without decoding
    live = sys.stderr.isatty()  # a bar on a terminal; in a log file, one line per part written instead
    bar = progress_bar(live, total=loader.num_samples, initial=min(loader.num_samples, start * args.batch_size),
                       unit="img", desc="embedding")
    chunk: list[Embeddings] = []
    part, counted = done, loader.stats()
    with torch.no_grad():
        for i, rec in enumerate(loader.records(), start=start):
            x, y = rec["images"], rec["labels"]
            if len(x):
                f = features(encoder, x.to(device)).float().cpu()
                chunk.append(Embeddings(f, y if y.min() >= 0 else None, rec["keys"],  # unlabeled data: -1
                                        order=torch.tensor(rec["order"], dtype=torch.int64)))
            bar.update(min(args.batch_size, loader.num_samples - i * args.batch_size))
            if (i + 1) % part_batches == 0 or i + 1 == len(loader):
                now = loader.stats()  # samples this part lost, kept with it: a resumed run still reports them
                _write_part(parts_dir, part, chunk, manifest, {k: now[k] - counted[k] for k in now})
                counted = now
                if not live:
                    seen = min(loader.num_samples, (i + 1) * args.batch_size)
                    print(f"embedding: part {part + 1}/{n_parts} written ({seen}/{loader.num_samples} images)",
                          file=sys.stderr, flush=True)
                part, chunk = part + 1, []
    bar.close()
    parts = [read_embeddings(p) for p in sorted(parts_dir.glob(f"{PART_PREFIX}*.safetensors"))]
    emb = concat(parts, meta).sorted()  # source order, whatever the number of loader workers
    emb.class_names = loader.class_names
    lost: dict[str, int] = {}
    for p in parts:
        for k, v in (p.meta.get("skipped") or {}).items():
            lost[k] = lost.get(k, 0) + v
    emb.meta["skipped"] = {k: v for k, v in lost.items() if v}
    out = write_embeddings(emb, args.out)
    shutil.rmtree(parts_dir, ignore_errors=True)
    shape = "x".join(map(str, emb.features.shape[1:]))
    extras = ", ".join(x for x in ("labels" if emb.labels is not None else "", "keys" if emb.keys else "") if x)
    skipped = sum(lost.values())
    print(f"wrote {out}: {len(emb.features)} images -> {emb.meta['pooling']} features {shape}"
          + (f", with {extras}" if extras else "") + (f"; {skipped} unreadable samples skipped" if skipped else ""))
    return 0


def _write_part(parts_dir: Path, part: int, chunk: list, manifest: dict, skipped: dict[str, int]) -> None:
    import torch

    from maevit.embeddings import Embeddings, concat, write_embeddings
    from maevit.fileio import write_text_atomic

    parts_dir.mkdir(parents=True, exist_ok=True)
    if not (parts_dir / MANIFEST).is_file():
        write_text_atomic(parts_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    # every sample of a part unreadable: an empty part still counts (concat leaves it out)
    emb = concat(chunk, {}) if chunk else Embeddings(torch.zeros(0, 0))
    emb.meta = {"skipped": skipped}
    write_embeddings(emb, parts_dir / f"{PART_PREFIX}{part:06d}.safetensors")


def _finished_parts(parts_dir: Path, manifest: dict) -> int:
    """Parts a previous run of the same command wrote (0 if none); refuses parts of another command."""
    if not parts_dir.is_dir():
        return 0
    found = parts_dir / MANIFEST
    old = json.loads(found.read_text()) if found.is_file() else None
    if old != manifest:
        diff = sorted(k for k in manifest if old is None or old.get(k) != manifest[k])
        raise ValueError(f"{parts_dir} holds parts of another embedding (it differs in {', '.join(diff)}): rerun "
                         f"the command that wrote them to finish it, or delete {parts_dir} to start over")
    n = 0
    while (parts_dir / f"{PART_PREFIX}{n:06d}.safetensors").is_file():
        n += 1
    return n


def main_knn(argv: list[str] | None = None) -> int:
    """``maevit knn BANK QUERY [--k 20] [--temperature 0.07]``: top-1 / top-5 of weighted kNN (cosine; the
    online probe's function and settings) of labeled query features against a labeled bank."""
    from maevit.config import Range, ranged

    parser = argparse.ArgumentParser(prog="maevit knn", description=main_knn.__doc__)
    parser.add_argument("bank", help="embedding file of the labeled memory bank (maevit embed)")
    parser.add_argument("query", help="embedding file of the labeled queries")
    parser.add_argument("--k", type=ranged(int, Range(1)), default=20, help="neighbours that vote")
    parser.add_argument("--temperature", type=ranged(float, Range(0, None, lo_open=True)), default=0.07)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from maevit.data.labels import ClassMismatchError, label_map
    from maevit.embeddings import EmbeddingFileError, read_embeddings
    from maevit.train.knn import knn_top_k

    try:
        bank, query = read_embeddings(args.bank), read_embeddings(args.query)
        for path, e in ((args.bank, bank), (args.query, query)):
            if e.labels is None:
                raise EmbeddingFileError(f"{path} has no labels (embedded from unlabeled data): kNN needs labeled "
                                         "bank and queries (a class-per-folder tree, shards with .cls, 'sample:...')")
            if e.features.ndim != 2:
                raise EmbeddingFileError(f"{path} holds patch grids {tuple(e.features.shape[1:])}: kNN compares "
                                         "pooled features (embed without --tokens)")
        if bank.features.shape[1] != query.features.shape[1]:
            raise EmbeddingFileError(f"the bank's features have {bank.features.shape[1]} dimensions, the queries' "
                                     f"{query.features.shape[1]}: embed both with the same model")
        labels = query.labels
        if bank.class_names and query.class_names and bank.class_names != query.class_names:
            mapping = label_map(query.class_names, bank.class_names, data=f"query {args.query}",
                                model=f"the bank {args.bank}")
            labels = labels.new_tensor(mapping)[labels]
        n_cls = len(bank.class_names) if bank.class_names else int(max(bank.labels.max(), labels.max())) + 1
        r = knn_top_k(bank.features, bank.labels, query.features, labels, num_classes=n_cls, k=args.k,
                      T=args.temperature)
    except (EmbeddingFileError, ClassMismatchError) as e:
        print(f"maevit knn: error: {e}", file=sys.stderr)
        return 2
    print(f"kNN top-1 {r['knn_top1']:.2f}%  top-5 {r['knn_top5']:.2f}%  (k={args.k}, T={args.temperature}, "
          f"{r['knn_samples']} queries, bank of {len(bank.features)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
