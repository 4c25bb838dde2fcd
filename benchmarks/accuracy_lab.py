"""Accuracy lab for the offline encoder: cache per-region classifier logits once, then score
encoder and fusion variants on a composite benchmark in numpy, without re-indexing.

The offline encoder's image embedding is a function of the classifier's 1000 logits
(softmax -> top classes -> probability-weighted class-text embeddings), so caching the
logits of every region of every photo lets each variant (top classes, temperature, class
texts, per-level calibration, per-level weights) be scored in seconds, exactly as the
exhaustive modes would score it (``single``, ``mvr``, ``himir-full`` are exhaustive MaxSim).

Usage::

    # 1. cache logits (crops as the index cuts them; --pad adds context around each box)
    python benchmarks/accuracy_lab.py cache /tmp/bench --out /tmp/bench/logits.npz
    python benchmarks/accuracy_lab.py cache /tmp/bench --pad 0.15 --out /tmp/bench/logits-pad15.npz
    # 2. score variants (one table: Recall@1/5/10, nDCG@10, grounding per mode)
    python benchmarks/accuracy_lab.py score /tmp/bench --logits /tmp/bench/logits.npz
    # 3. the ceiling of any level choice: every level subset, per-query oracles, by object size
    python benchmarks/accuracy_lab.py oracle /tmp/bench --logits /tmp/bench/logits.npz

Variants are chosen on the tuning set (``/tmp/bench-tune``, seed 1) and only then read on the
evaluation set; the script fits nothing to the set it scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from himir_rag.bench.metrics import box_iou
from himir_rag.bench.runner import match_objects, ranking_metrics
from himir_rag.config import HiMIRConfig
from himir_rag.decompose import get_decomposer
from himir_rag.hierarchy import build_tree, focus_boxes
from himir_rag.encoders.offline import (CLASS_TEMPLATES, OfflineEncoder, imagenet_class_lemmas, imagenet_class_names,
                                        sentence_model_key, to_pixels)
from himir_rag.encoders.prompt_cache import cached_sentence_embeddings
from himir_rag.ingest import cut, region_decomposer

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pad_box(box: tuple[int, int, int, int], size: tuple[int, int], pad: float) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * pad, (y1 - y0) * pad
    return (max(0, int(x0 - dx)), max(0, int(y0 - dy)), min(size[0], int(x1 + dx) + 1), min(size[1], int(y1 + dy) + 1))


def cache_logits(bench: Path, out: Path, *, pad: float, batch: int, layout: str, decomposer: str,
                 overlap: float, variant: str = "lite0", work_size: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    encoder = OfflineEncoder(variant=variant)
    encoder.load()
    classifier = encoder._classifier
    config = HiMIRConfig(layout=layout, decomposer=decomposer, region_overlap=overlap)
    decomposer = region_decomposer(config)
    if work_size is not None:  # the segmentation's working side (segments / objects decomposers only)
        if not hasattr(decomposer, "work_size"):
            raise SystemExit(f"--work-size applies to the segments and objects decomposers, not {config.decomposer!r}")
        decomposer.work_size = work_size
    scenes = _jsonl(bench / "scenes.jsonl")
    side = encoder.image_size
    logits, levels, boxes, owners = [], [], [], []
    started = time.perf_counter()
    for n, scene in enumerate(scenes):
        image = Image.open(bench / scene["path"]).convert("RGB")
        tree, crops, work = cut(image, decomposer, min_region_frac=config.min_region_frac)
        if pad:
            sx = work.size[0] / image.size[0]
            crops = [work.crop(_pad_box(tuple(int(v * sx) for v in box), work.size, pad)) for box in tree.boxes]
        pixels = np.stack([np.asarray(c.resize((side, side), Image.BILINEAR)) for c in crops])
        tensor = to_pixels(pixels)
        with torch.inference_mode():
            out_logits = torch.cat([classifier.logits(tensor[i:i + batch]) for i in range(0, len(tensor), batch)])
        logits.append(out_logits.numpy().astype(np.float32))
        levels.append(tree.levels.astype(np.int8))
        boxes.append(tree.boxes.astype(np.int32))
        owners.append(np.full(len(tree), n, dtype=np.int32))
        if n % 50 == 0:
            print(f"{n}/{len(scenes)} photos, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    np.savez(out, logits=np.concatenate(logits), levels=np.concatenate(levels), boxes=np.concatenate(boxes),
             owners=np.concatenate(owners), scene_ids=np.array([s["scene_id"] for s in scenes]))
    print(f"cached {sum(len(x) for x in logits)} regions of {len(scenes)} photos in "
          f"{time.perf_counter() - started:.0f} s -> {out}", file=sys.stderr)


class Lab:
    """One benchmark set's cached logits, queries and sub-query text vectors."""

    def __init__(self, bench: Path, logits_path: Path) -> None:
        data = np.load(logits_path, allow_pickle=False)
        self.logits, self.levels, self.boxes = data["logits"], data["levels"], data["boxes"]
        self.owners, self.scene_ids = data["owners"], list(data["scene_ids"])
        self.n_images = len(self.scene_ids)
        self.scenes = {s["scene_id"]: s for s in _jsonl(bench / "scenes.jsonl")}
        self.queries = _jsonl(bench / "queries.jsonl")
        self.qrels = {r["query_id"]: set(r["scene_ids"]) for r in _jsonl(bench / "qrels.jsonl")}
        self.encoder = OfflineEncoder()
        self.encoder.load_text()  # class texts are embedded per variant (class_embeddings)
        rule = get_decomposer("rule")
        self.subqueries = [list(rule.decompose(q["query"])) or [q["query"]] for q in self.queries]
        self.flat = sorted({s for subs in self.subqueries for s in subs} | {q["query"] for q in self.queries})
        self.plain_vectors = self.encoder.embed_texts(self.flat)
        self.text_vector = dict(zip(self.flat, self.plain_vectors))
        self.include_full_query = False
        self.box_rule: str | None = None  # see refine_box

    def set_query_side(self, template: str | None, project: tuple[float, int] | None,
                       class_emb: np.ndarray) -> None:
        """Sub-query vectors: wrapped in ``template`` (e.g. "a photo of {}") and/or projected onto
        the class texts (softmax over cosine / tau, top classes, weighted mean of class vectors)."""
        vectors = self.plain_vectors if template is None else self.encoder.embed_texts(
            [template.format(t) for t in self.flat])
        if project is not None:
            tau, top = project
            logits = vectors @ class_emb.T / tau
            logits -= logits.max(axis=1, keepdims=True)
            w = np.exp(logits)
            cutoff = np.partition(w, -top, axis=1)[:, -top][:, None]
            w = np.where(w >= cutoff, w, 0.0)
            vectors = w @ class_emb
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        self.text_vector = dict(zip(self.flat, vectors))

    def region_vectors(self, class_emb: np.ndarray, *, top: int, temperature: float) -> np.ndarray:
        z = self.logits / temperature
        z = z - z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        if top < probs.shape[1]:
            cutoff = np.partition(probs, -top, axis=1)[:, -top][:, None]
            probs = np.where(probs >= cutoff, probs, 0.0)
        vectors = probs @ class_emb
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def per_level_max(self, vectors: np.ndarray, texts: np.ndarray) -> np.ndarray:
        """(n_texts, 3 levels, n_images) best similarity per level (-inf where a level is empty)."""
        sims = texts @ vectors.T
        out = np.full((len(texts), 3, self.n_images), -np.inf, dtype=np.float32)
        for level in range(3):
            mask = self.levels == level
            level_sims, level_owner = sims[:, mask], self.owners[mask]
            order = np.argsort(level_owner, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(level_owner[order]) != 0])
            out[:, level, level_owner[order][starts]] = np.maximum.reduceat(level_sims[:, order], starts, axis=1)
        return out

    def metrics(self, scores: np.ndarray, query_id: str) -> dict[str, float]:
        """Ranking metrics of the top 10 photos by ``scores`` (n_images,) against the query's qrels."""
        ranked = [self.scene_ids[i] for i in np.argsort(-scores, kind="stable")[:10]]
        return ranking_metrics(ranked, self.qrels[query_id])

    def _photo_starts(self) -> np.ndarray:
        """First row of each photo (the cache holds each photo's rows together, in its tree's order)."""
        return np.flatnonzero(np.r_[True, np.diff(self.owners) != 0])

    def parents(self) -> np.ndarray:
        """Each row's parent row, by :func:`build_tree`'s rule (a segment's region of largest overlap, a
        region's the global view); the global view is its own."""
        parent = np.arange(len(self.levels))
        starts = self._photo_starts()
        for start, end in zip(starts, np.r_[starts[1:], len(self.levels)]):
            levels, boxes = self.levels[start:end], self.boxes[start:end]
            tree = build_tree(int(boxes[0, 2]), int(boxes[0, 3]), boxes[levels == 1], boxes[levels == 2])
            parent[start:end] = np.where(tree.parents >= 0, start + tree.parents, parent[start:end])
        return parent

    def per_photo_max(self, sims: np.ndarray) -> np.ndarray:
        """(n_texts, n_images) best of ``sims`` (n_texts, n_rows) over each photo's rows."""
        starts = self._photo_starts()
        out = np.full((len(sims), self.n_images), -np.inf, dtype=np.float32)
        out[:, self.owners[starts]] = np.maximum.reduceat(sims, starts, axis=1)
        return out

    def evaluate(self, vectors: np.ndarray, *, scale: np.ndarray | None = None, shift: np.ndarray | None = None,
                 fuse: np.ndarray | None = None, agg: str = "mean", path: float = 0.0) -> dict[str, dict[str, float]]:
        """Mean ranking metrics per mode and grounding (IoU >= 0.3) of himir-full's best region.

        A per-level affine map ``s * scale[level] + shift[level]`` is applied to every
        similarity before the max (monotone per level, so bounds stay valid). ``agg``: how a
        photo's per-sub-query scores become one (``mean``, the engine's; ``z``: each sub-query's
        scores z-scored over the collection first; ``zlevel``: each level's maxima z-scored
        over the collection before the max over levels; ``min``). ``path`` > 0: himir-full
        scores each row as (own + path x parent's similarity) / (1 + path), a segment
        supported by its region (the other modes unchanged).
        """
        scale = np.ones(3, np.float32) if scale is None else scale
        shift = np.zeros(3, np.float32) if shift is None else shift
        modes = {"single": (0,), "mvr": (0, 2), "himir-full": (0, 1, 2)}
        rows: dict[str, list[dict]] = {m: [] for m in modes}
        parent = self.parents() if path > 0 else None
        ground = []
        for q, subs in zip(self.queries, self.subqueries):
            if self.include_full_query and q["query"] not in subs:
                subs = [*subs, q["query"]]
            sub_vec = np.stack([self.text_vector[s] for s in subs])
            best = self.per_level_max(vectors, sub_vec) * scale[None, :, None] + shift[None, :, None]
            if agg == "zlevel":
                best = (best - best.mean(axis=2, keepdims=True)) / (best.std(axis=2, keepdims=True) + 1e-9)
            for mode, allowed in modes.items():
                if mode == "single":
                    full = self.per_level_max(vectors, self.text_vector[q["query"]][None])[0, 0]
                    scores = full
                elif mode == "himir-full" and fuse is not None:  # weighted sum of the per-level maxima
                    scores = np.tensordot(fuse, best, axes=([0], [1])).mean(axis=0)
                elif mode == "himir-full" and path > 0:
                    sims = sub_vec @ vectors.T
                    scores = self.per_photo_max((sims + path * sims[:, parent]) / (1 + path)).mean(axis=0)
                else:
                    scores = _aggregate(best[:, list(allowed), :].max(axis=1), agg)
                rows[mode].append(self.metrics(scores, q["id"]))
            ground.extend(self._grounding(q, subs, vectors, scale, shift))
        result = {m: {k: float(np.mean([r[k] for r in rs])) for k in ("recall@1", "recall@5", "recall@10", "ndcg@10")}
                  for m, rs in rows.items()}
        hit = np.array([h for h, _ in ground], bool)
        area = np.array([a for _, a in ground], float)
        result["grounding"] = {"himir-full": float(hit.mean()) if ground else float("nan"), "n": len(ground)}
        for name, (low, high) in SIZE_BUCKETS.items():  # the bench runner's buckets
            chosen = (area >= low) & (area < high)
            result["grounding"][name] = float(hit[chosen].mean()) if chosen.any() else float("nan")
        return result

    def _grounding(self, query: dict, subs: list[str], vectors: np.ndarray, scale: np.ndarray,
                   shift: np.ndarray) -> list[tuple[bool, float]]:
        scene = self.scenes[query["scene_id"]]
        image = self.scene_ids.index(query["scene_id"])
        rows = np.flatnonzero(self.owners == image)
        by_name = {o["name"]: o for o in scene["objects"]}
        hits = []
        for sub, name in match_objects(subs, query["objects"]):
            sims = vectors[rows] @ self.text_vector[sub] * scale[self.levels[rows]] + shift[self.levels[rows]]
            box = refine_box(sims, self.boxes[rows], self.levels[rows], self.box_rule)
            hits.append((box_iou(box.tolist(), by_name[name]["bbox"]) >= 0.3, by_name[name]["area_frac"]))
        return hits


SIZE_BUCKETS = {"small": (0.0, 0.05), "medium": (0.05, 0.2), "large": (0.2, 1.01)}  # of the frame's area


def _aggregate(per_subquery: np.ndarray, agg: str) -> np.ndarray:
    """(s, n) per-sub-query photo scores -> (n,) (see :meth:`Lab.evaluate`'s ``agg``)."""
    if agg == "z":
        mean, std = per_subquery.mean(axis=1, keepdims=True), per_subquery.std(axis=1, keepdims=True)
        return ((per_subquery - mean) / (std + 1e-9)).mean(axis=0)
    if agg == "min":
        return per_subquery.min(axis=0)
    return per_subquery.mean(axis=0)  # mean (the engine's), and zlevel (normalised before the max)


LEVEL_SETS = {"global": (0,), "regions": (1,), "segments": (2,), "global+regions": (0, 1),
              "global+segments (mvr)": (0, 2), "regions+segments": (1, 2), "all (himir-full)": (0, 1, 2)}


def oracle(lab: Lab) -> None:
    """How much any choice of levels could gain over mvr: Recall@10 of each level subset's max, of a
    per-query oracle picking the better of mvr's and himir-full's rankings, of a per-query oracle
    over every subset, and mvr / himir-full by the size of the query's named objects (mean area)."""
    vectors = lab.region_vectors(class_embeddings(lab.encoder, "both"), top=20, temperature=1.0)
    recall = {name: [] for name in LEVEL_SETS}
    sizes = []
    for q, subs in zip(lab.queries, lab.subqueries):
        best = lab.per_level_max(vectors, np.stack([lab.text_vector[s] for s in subs]))
        for name, levels in LEVEL_SETS.items():
            recall[name].append(lab.metrics(best[:, list(levels), :].max(axis=1).mean(axis=0), q["id"])["recall@10"])
        by_name = {o["name"]: o["area_frac"] for o in lab.scenes[q["scene_id"]]["objects"]}
        sizes.append(np.mean([by_name[n] for n in q["objects"] if n in by_name] or [np.nan]))
    table = {name: np.array(values) for name, values in recall.items()}
    mvr, full = table["global+segments (mvr)"], table["all (himir-full)"]
    print("| levels | Recall@10 |\n|---|---|")
    for name, values in table.items():
        print(f"| {name} | {values.mean():.3f} |")
    print(f"| per-query oracle: the better of mvr and himir-full | {np.maximum(mvr, full).mean():.3f} |")
    print(f"| per-query oracle over every subset above | {np.max(np.stack(list(table.values())), axis=0).mean():.3f} |")
    sizes = np.array(sizes)
    print("\n| named objects' mean size | queries | mvr | himir-full |\n|---|---|---|---|")
    for name, (low, high) in SIZE_BUCKETS.items():
        chosen = (sizes >= low) & (sizes < high)
        print(f"| {name} | {int(chosen.sum())} | {mvr[chosen].mean():.3f} | {full[chosen].mean():.3f} |")


def refine_box(sims: np.ndarray, boxes: np.ndarray, levels: np.ndarray, rule: str | None) -> np.ndarray:
    """The box reported for one sub-query in one photo, from its similarities to the photo's regions.

    ``None``: the best region's box (``RegionMatch.region_bbox``). ``softz:T/k``: the library's focus
    box (:func:`himir_rag.hierarchy.focus_boxes`, what ``RegionMatch.bbox`` reports at
    ``focus_temperature=T``, ``focus_spread=k``); ``gsoftz:T/k``: the same with the geometric mean of
    the regions' sizes; ``csoftz:T/k``: ``softz`` whose growth leaves out the regions that contain the
    best one; ``cover:T/theta``: the bounding box of where the regions' weighted coverage is
    at least ``theta`` of its maximum (nested boxes shrink to their core, adjacent ones join).
    ``union:D``: the bounding box of the regions of the best region's level that score within ``D``
    of it and are connected to it
    through touching or overlapping boxes. ``soft:T``: the mean of all boxes weighted by
    ``exp((s - s_max) / T)``.
    """
    best = int(np.argmax(sims))
    if rule is None:
        return boxes[best]
    kind, value = rule.split(":")
    if kind == "softz":  # softz:T[/k]: the library's focus box at temperature T, spread k (default 0)
        temperature, spread = (value.split("/") + ["0"])[:2]
        return focus_boxes(sims[:, None], boxes, float(temperature), float(spread))[0]
    if kind in ("cover", "csoftz", "gsoftz"):  # softz's weights, another box
        temperature, other = value.split("/")
        w = np.exp((sims - sims[best]) / (float(temperature) * max(float(sims.std()), 1e-12)))
        w /= w.sum()
        b = boxes.astype(np.float64)
    if kind == "cover":  # cover:T/theta: bounding box of where the weighted coverage >= theta x its maximum
        xs, ys = np.unique(b[:, [0, 2]]), np.unique(b[:, [1, 3]])  # the cells the box edges cut
        cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
        inx = (b[:, 0, None] <= cx) & (cx <= b[:, 2, None])  # (regions, cells in x)
        iny = (b[:, 1, None] <= cy) & (cy <= b[:, 3, None])
        cover = np.einsum("r,rx,ry->xy", w, inx.astype(float), iny.astype(float))
        keep = cover >= float(other) * cover.max()
        ix, iy = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
        return np.array([xs[ix[0]], ys[iy[0]], xs[ix[-1] + 1], ys[iy[-1] + 1]])
    if kind in ("csoftz", "gsoftz"):  # csoftz:T/k: growth without the regions containing the best one;
        centre, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2  # gsoftz:T/k: geometric mean size
        mean = w @ centre
        growth = w
        if kind == "csoftz":
            contains = (b[:, :2] <= b[best, :2]).all(axis=1) & (b[:, 2:] >= b[best, 2:]).all(axis=1)
            growth = np.where(contains, 0.0, w)
        sizes = w @ half ** 2 if kind == "csoftz" else np.exp(2 * (w @ np.log(np.maximum(half, 0.5))))
        size = np.sqrt(sizes + float(other) * (growth @ (centre - mean) ** 2))
        return np.concatenate([np.maximum(mean - size, b[:, :2].min(axis=0)),
                               np.minimum(mean + size, b[:, 2:].max(axis=0))])
    if kind in ("soft", "softlocal"):  # softlocal: the global view's box left out (unless it is the best)
        w = np.exp((sims - sims[best]) / float(value))
        if kind == "softlocal" and levels[best] != 0:
            w = np.where(levels == 0, 0.0, w)
        return (w[:, None] * boxes).sum(axis=0) / w.sum()
    if kind != "union":
        raise SystemExit(f"unknown box rule {rule!r} "
                         "(union:D, soft:T, softlocal:T, softz:T/k, gsoftz:T/k, csoftz:T/k or cover:T/theta)")
    near = np.flatnonzero((levels == levels[best]) & (sims >= sims[best] - float(value)))
    member, frontier = {best}, [best]
    while frontier:
        i = frontier.pop()
        for j in near:
            if j not in member and boxes[j][0] <= boxes[i][2] and boxes[i][0] <= boxes[j][2] \
                    and boxes[j][1] <= boxes[i][3] and boxes[i][1] <= boxes[j][3]:
                member.add(int(j))
                frontier.append(int(j))
    chosen = boxes[sorted(member)]
    return np.array([chosen[:, 0].min(), chosen[:, 1].min(), chosen[:, 2].max(), chosen[:, 3].max()])


def class_embeddings(encoder: OfflineEncoder, how: str) -> np.ndarray:
    """(1000, 384) class-text vectors: ``prompt`` (today's), ``synonyms`` (all lemmas, one prompt),
    ``templates`` (first lemma, several prompts), ``both`` (all lemmas x prompts, averaged)."""
    names = [ls if how in ("synonyms", "both") else ls[:1] for ls in imagenet_class_lemmas()]
    templates = CLASS_TEMPLATES if how in ("templates", "both") else CLASS_TEMPLATES[:1]
    texts = [[t.format(n) for n in ns for t in templates] for ns in names]
    flat = [t for ts in texts for t in ts]
    # the encoder's own prompt cache: `both` and `prompt` are the ensemble / prompt class texts it already embedded
    vectors = cached_sentence_embeddings(sentence_model_key(), flat, dim=encoder.dim, encode=encoder.embed_texts)
    bounds = np.cumsum([0] + [len(ts) for ts in texts])
    means = np.stack([vectors[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def probe_calibration(lab: Lab, vectors: np.ndarray, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label-free per-level map: z-score of each level's per-image best similarity to probe texts."""
    best = lab.per_level_max(vectors, probes)  # (n_probes, 3, n_images)
    mean = np.array([best[:, level, :].mean() for level in range(3)], dtype=np.float32)
    std = np.array([best[:, level, :].std() for level in range(3)], dtype=np.float32)
    return 1.0 / std, -mean / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache")
    c.add_argument("bench", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--pad", type=float, default=0.0)
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--layout", default="1+4+16")
    c.add_argument("--decomposer", default="grid")
    c.add_argument("--overlap", type=float, default=HiMIRConfig().region_overlap)
    c.add_argument("--variant", default="lite0", help="classifier: lite0 (default) or lite2")
    c.add_argument("--work-size", type=int, default=None,
                   help="longest side the segments / objects decomposers segment at (library default: HiMIRConfig.segment_work_size, 128)")
    s = sub.add_parser("score")
    s.add_argument("bench", type=Path)
    s.add_argument("--logits", type=Path, required=True)
    s.add_argument("--variants", default="", help="comma-separated variants (see sweep)")
    o = sub.add_parser("oracle", help="Recall@10 of every level subset and per-query oracles (see oracle)")
    o.add_argument("bench", type=Path)
    o.add_argument("--logits", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "cache":
        cache_logits(args.bench, args.out, pad=args.pad, batch=args.batch, layout=args.layout,
                     decomposer=args.decomposer, overlap=args.overlap, variant=args.variant,
                     work_size=args.work_size)
        return
    lab = Lab(args.bench, args.logits)
    if args.command == "oracle":
        oracle(lab)
        return
    sweep(lab, args.variants.split(","))


def probe_texts(encoder: OfflineEncoder, n: int, seed: int) -> np.ndarray:
    """Label-free probes: ``n`` class names drawn at random (one seed), embedded as queries are."""
    names = imagenet_class_names()
    rng = np.random.default_rng(seed)
    return encoder.embed_texts([names[i] for i in rng.choice(len(names), size=n, replace=False)])


def sweep(lab: Lab, variants: list[str]) -> None:
    """One row per variant: ``emb=prompt|synonyms|templates|both``, ``top=N``, ``t=T``,
    ``cal=none|probe|shift:R:S``, ``fuse=a:b:c``, ``agg=mean|z|zlevel|min``, ``path=L``, ``box=union:D|soft:T|softlocal:T|softz:T/k|gsoftz:T/k|csoftz:T/k|cover:T/theta``
    (the reported box, see :func:`refine_box`; ``softz`` is the library's focus box) joined by ``+`` (e.g.
    ``emb=both+top=10+cal=probe``)."""
    header = ("| variant | single R@10 | mvr R@10 | himir-full R@1 | R@5 | R@10 | nDCG@10 | grounding | "
              "small | medium | large | regions a photo | himir-full dots a query |")
    print(header)
    print("|---" * 13 + "|")
    per_photo = len(lab.levels) / lab.n_images
    mean_subs = float(np.mean([len(subs) for subs in lab.subqueries]))
    cache: dict[str, np.ndarray] = {}
    for variant in variants:
        opts = dict(part.split("=") for part in variant.split("+") if part)
        how = opts.get("emb", "prompt")
        if how not in cache:
            cache[how] = class_embeddings(lab.encoder, how)
        vectors = lab.region_vectors(cache[how], top=int(opts.get("top", 20)), temperature=float(opts.get("t", 1)))
        project = None
        if "qproj" in opts:  # qproj=tau:top
            tau, top = opts["qproj"].split(":")
            project = (float(tau), int(top))
        lab.set_query_side(opts.get("qt", "").replace("_", " ") or None, project, cache[how])
        lab.include_full_query = opts.get("full", "0") == "1"  # full=1: the whole query is a sub-query too
        lab.box_rule = opts.get("box")  # box=union:D or box=soft:T (refine_box): the reported region
        scale = shift = None
        if opts.get("cal", "none") == "probe":
            scale, shift = probe_calibration(lab, vectors, probe_texts(lab.encoder, 200, seed=0))
        elif opts.get("cal", "none").startswith("shift"):  # shift:<region>:<segment>, global 0
            _, region, segment = opts["cal"].split(":")
            scale, shift = np.ones(3, np.float32), np.array([0, float(region), float(segment)], np.float32)
        fuse = None
        if "fuse" in opts:  # fuse=a:b:c weights of the global, region, segment maxima (summed)
            fuse = np.array([float(w) for w in opts["fuse"].split(":")], np.float32)
        r = lab.evaluate(vectors, scale=scale, shift=shift, fuse=fuse, agg=opts.get("agg", "mean"),
                         path=float(opts.get("path", 0)))
        f, g = r["himir-full"], r["grounding"]
        print(f"| {variant or 'baseline'} | {r['single']['recall@10']:.3f} | {r['mvr']['recall@10']:.3f} | "
              f"{f['recall@1']:.3f} | {f['recall@5']:.3f} | {f['recall@10']:.3f} | {f['ndcg@10']:.3f} | "
              f"{r['grounding']['himir-full']:.3f} | {g['small']:.3f} | {g['medium']:.3f} | {g['large']:.3f} | "
              f"{per_photo:.1f} | {per_photo * mean_subs * lab.n_images:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
