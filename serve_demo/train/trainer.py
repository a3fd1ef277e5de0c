"""Train a detector on a COCO-format folder; write a state_dict and its label map.

Phases, as in torchvision's detection references: load data, create model, train with periodic
validation mAP, export. Checkpoints (model, optimizer, scheduler, epoch, args) are written every
epoch to ``RUN_DIR/checkpoint.pt``; running the same command again resumes from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from serve_demo.core import defaults
from serve_demo.core.models import (
    DEMO_ARCH,
    available_archs,
    build_model,
    load_state_dict_file,
    parse_model_kwargs,
    task_of,
)
from serve_demo.data.coco import CocoDetection, collate, keypoint_names, label_map_from_coco, load_coco
from serve_demo.data.cocometrics import coco_metrics, to_coco_detections

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Training options (shared by ``python -m serve_demo train`` and ``make train``)."""
    p.add_argument("--data", required=True, help="COCO-format folder with train/ valid/ test/")
    p.add_argument("--name", required=True, help="model name: writes WEIGHTS_DIR/NAME.pt and index_to_name/NAME.json")
    p.add_argument("--arch", default=DEMO_ARCH, choices=available_archs(), help="architecture")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=2, help="validate every N epochs (0: only at the end)")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--run-dir", default=None, help="checkpoints and logs (default: runs/NAME)")
    p.add_argument("--weights-dir", default="weights", help="where NAME.pt is written")
    p.add_argument("--labels-dir", default="index_to_name", help="where NAME.json is written")
    p.add_argument("--fp16", action="store_true", help="store exported weights in float16 (half the size)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--max-iters", type=int, default=0, help="stop after N iterations (smoke tests)")
    p.add_argument("--init-backbone", default=None, metavar="WEIGHTS",
                   help="start the backbone from another model's state_dict (its backbone.* tensors "
                        "of matching shape), e.g. weights/shapes.pt for maskrcnn_tiny")
    p.add_argument("--mask-threshold", type=float, default=defaults.MASK_THRESHOLD,
                   help="mask binarisation for segm mAP")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="extra keyword arguments for the architecture's builder, e.g. training-only "
                        "'{\"rpn_post_nms_top_n_train\": 300}' (kept in the training card; the ones that change "
                        "inference must be given to make archive as MODEL_KWARGS too)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


@torch.inference_mode()
def evaluate(model: torch.nn.Module, dataset: CocoDetection, device: torch.device,
             batch_size: int = 8, mask_threshold: float = defaults.MASK_THRESHOLD) -> dict[str, float]:
    """COCO metrics of ``model`` on ``dataset`` (model left in eval mode).

    bbox metrics are named ``mAP``, ``mAP_50``, ...; with masks or keypoints in the dataset,
    ``segm_mAP``, ... or ``keypoints_mAP``, ... are added.
    """
    from tqdm import tqdm

    from serve_demo.core.masks import encode_all, keypoint_triplets

    model.eval()
    label_to_cat = {lab: cat for cat, lab in dataset.cat_to_label.items()}
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    rows: list[dict] = []
    for images, targets in tqdm(loader, desc="validate", leave=False, file=sys.stderr):
        outputs = model([im.to(device) for im in images])
        for out, tgt in zip(outputs, targets):
            segs = encode_all(out["masks"].cpu(), mask_threshold) if dataset.masks else None
            kps = keypoint_triplets(out["keypoints"].cpu(), out.get("keypoints_scores")) \
                if dataset.keypoints else None
            rows += to_coco_detections(int(tgt["image_id"]), out["boxes"].cpu().tolist(),
                                       out["scores"].cpu().tolist(), out["labels"].cpu().tolist(),
                                       label_to_cat, segs, kps)
    metrics = coco_metrics(dataset.coco, rows, "bbox")
    for kind, on in (("segm", dataset.masks), ("keypoints", dataset.keypoints)):
        if on:
            metrics.update({f"{kind}_{k}": v for k, v in coco_metrics(dataset.coco, rows, kind).items()})
    return metrics


def init_backbone(model: torch.nn.Module, path: str) -> int:
    """Copy the ``backbone.*`` tensors of matching name and shape from ``path``; return how many."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    picked = {k: v for k, v in state.items()
              if k.startswith("backbone.") and k in own and own[k].shape == v.shape}
    if not picked:
        raise SystemExit(f"--init-backbone {path}: no backbone.* tensor fits this architecture")
    model.load_state_dict(picked, strict=False)
    wanted = sum(1 for k in own if k.startswith("backbone."))
    log.info("Backbone initialised from %s: %d of %d tensors", path, len(picked), wanted)
    return len(picked)


def _lr_lambda(warmup: int, total: int):
    def f(it: int) -> float:
        if it < warmup:
            return 0.001 + (1 - 0.001) * it / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))
    return f


def export_weights(model: torch.nn.Module, path: Path, fp16: bool) -> None:
    """Write the state_dict (optionally float16) atomically."""
    state = {k: (v.half() if fp16 and torch.is_floating_point(v) else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def command_line() -> str:
    """How this run was started, as a user would type it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "serve_demo")):
        argv[0] = "python -m serve_demo"
    return " ".join(argv)


def main(args: argparse.Namespace) -> int:
    """Run training; return a process exit code."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or Path("runs") / args.name)
    run_dir.mkdir(parents=True, exist_ok=True)

    log.info("Loading data from %s", args.data)
    label_map = label_map_from_coco(load_coco(args.data, "train"))
    task = task_of(args.arch)
    kinds = {"masks": task == "masks", "keypoints": task == "keypoints"}
    train_set = CocoDetection(args.data, "train", label_map, hflip=True, **kinds)
    valid_set = CocoDetection(args.data, "valid", label_map, **kinds)
    log.info("%d classes (%s); %d train / %d valid images", len(label_map) - 1,
             ", ".join(list(label_map.values())[1:]), len(train_set), len(valid_set))
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen,
                        collate_fn=collate, num_workers=args.workers, drop_last=True,
                        persistent_workers=args.workers > 0)

    log.info("Creating model %s on %s", args.arch, device)
    try:
        model_kwargs = parse_model_kwargs(args.model_kwargs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if task == "keypoints":
        model_kwargs["num_keypoints"] = len(keypoint_names(train_set.coco, label_map))
    model = build_model(args.arch, num_classes=len(label_map), **model_kwargs)
    if args.init_backbone and not (run_dir / "checkpoint.pt").exists():
        init_backbone(model, args.init_backbone)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_iters = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup_iters, total_iters))
    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0

    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists() and not args.no_resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["arch"] != args.arch or ckpt["label_map"] != label_map:
            raise SystemExit(f"{ckpt_path} was made for {ckpt['arch']} with other classes; "
                             "pass --no-resume or another --run-dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, elapsed = ckpt["epoch"] + 1, ckpt["history"], ckpt["elapsed_s"]
        torch.set_rng_state(ckpt["rng"])
        log.info("Resuming from %s at epoch %d (%.1f min trained)", ckpt_path, start_epoch, elapsed / 60)

    log.info("Start training: %d epochs x %d iterations", args.epochs, len(loader))
    iters_done = 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, dynamic_ncols=True)
        running: dict[str, float] = {}
        for images, targets in bar:
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                log.error("loss is %s at epoch %d, stopping: %s", loss.item(), epoch,
                          {k: v.item() for k, v in losses.items()})
                return 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            for k, v in losses.items():
                running[k] = 0.9 * running.get(k, v.item()) + 0.1 * v.item()
            bar.set_postfix(loss=f"{sum(running.values()):.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            iters_done += 1
            if args.max_iters and iters_done >= args.max_iters:
                break
        elapsed += time.time() - t0
        record = {"epoch": epoch + 1, "elapsed_min": round(elapsed / 60, 2),
                  **{f"loss_{k}": round(v, 4) for k, v in running.items()}}
        last = epoch + 1 == args.epochs or (args.max_iters and iters_done >= args.max_iters)
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            metrics = evaluate(model, valid_set, device, mask_threshold=args.mask_threshold)
            record.update({f"valid_{k}": round(v, 4) for k, v in metrics.items()})
            log.info("epoch %d: valid mAP %.4f, mAP@0.5 %.4f%s", epoch + 1, metrics["mAP"], metrics["mAP_50"],
                     f", segm mAP {metrics['segm_mAP']:.4f}, segm mAP@0.5 {metrics['segm_mAP_50']:.4f}"
                     if "segm_mAP" in metrics else "")
        history.append(record)
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch,
                    "args": {k: v for k, v in vars(args).items() if not callable(v)},
                    "arch": args.arch, "label_map": label_map, "history": history,
                    "elapsed_s": elapsed, "rng": torch.get_rng_state()}, run_dir / "checkpoint.tmp")
        (run_dir / "checkpoint.tmp").replace(ckpt_path)
        if last:
            break

    weights = Path(args.weights_dir) / f"{args.name}.pt"
    labels = Path(args.labels_dir) / f"{args.name}.json"
    weights.parent.mkdir(parents=True, exist_ok=True)
    labels.parent.mkdir(parents=True, exist_ok=True)
    export_weights(model, weights, args.fp16)
    labels.write_text(json.dumps(label_map, indent=2) + "\n")
    if task == "keypoints":
        names_path = Path(args.labels_dir) / f"{args.name}.keypoints.json"
        names_path.write_text(json.dumps(keypoint_names(train_set.coco, label_map)) + "\n")
    card = {"name": args.name, "arch": args.arch, "data": str(args.data), "seed": args.seed,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "device": str(device), "threads": torch.get_num_threads(),
            **({"model_kwargs": model_kwargs} if model_kwargs else {}),
            "train_minutes": round(elapsed / 60, 1), "command": command_line(),
            "final": history[-1] if history else {}}
    (Path(args.weights_dir) / f"{args.name}.json").write_text(json.dumps(card, indent=1) + "\n")
    log.info("Wrote %s (%.1f MB), %s and the training card %s.json",
             weights, weights.stat().st_size / 1e6, labels, args.name)
    return 0
