"""Module entry point for fine-tuning, usable directly or under torchrun::

    python -m edgec.train.run MODEL --data DATA -o OUT [options]
    torchrun --standalone --nproc_per_node 2 -m edgec.train.run MODEL --data DATA -o OUT [options]

Rank 0 prints one line per epoch to stderr and the result as JSON to stdout; other ranks print nothing.
Exit codes: 0 ok, 2 bad input, 130 interrupted (resume with --resume), 3 internal error.
"""
from __future__ import annotations

import argparse
import json
import sys

from edgec.errors import EXIT_INTERNAL, EdgecError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgec.train.run", description="Fine-tune an edgec checkpoint.")
    p.add_argument("model", help="input checkpoint")
    p.add_argument("--data", required=True, help="folder with labels.csv, tensor file, or package.module:function")
    p.add_argument("-o", "--output", required=True, help="output checkpoint")
    p.add_argument("--arch", default=None, help="architecture for a bare state_dict / user architecture")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of all steps used for linear warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient L2 norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=None, help="teacher checkpoint for logits distillation")
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--resume", action="store_true", help="continue from the resume file")
    p.add_argument("--resume-file", default=None, help="default: OUTPUT.resume")
    p.add_argument("--keep-resume", action="store_true", help="keep the resume file after success")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--split-seed", type=int, default=None, help="seed of the val split when the data has none")
    p.add_argument("--sample-rate", type=int, default=None)
    p.add_argument("--n-mels", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    return p


def main(argv=None) -> int:
    from edgec.train.distributed import is_main_process
    from edgec.train.job import finetune_file

    args = build_parser().parse_args(argv)
    main_rank = is_main_process()
    data_options = {k: v for k, v in {
        "val_fraction": args.val_fraction, "seed": args.split_seed, "sample_rate": args.sample_rate,
        "n_mels": args.n_mels, "frames": args.frames, "cache_dir": args.cache_dir}.items() if v is not None}

    def progress(event: dict) -> None:
        if event["event"] == "start":
            print(f"training {event['epochs']} epochs x {event['steps_per_epoch']} steps on {event['world_size']} "
                  f"process(es), {event['batch_size_per_process']} examples per process per step", file=sys.stderr)
        elif event["event"] == "epoch":
            m = event["monitor"]
            print(f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f}, "
                  f"val {m} {event['val'][m]:.4f}, val loss {event['val']['loss']:.4f}"
                  f"{' *' if event['is_best'] else ''} ({event['seconds']:.1f}s)", file=sys.stderr, flush=True)

    try:
        result = finetune_file(
            args.model, args.data, args.output, arch=args.arch, teacher=args.teacher, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
            grad_clip=args.grad_clip, seed=args.seed, kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
            resume=args.resume, resume_file=args.resume_file, keep_resume=args.keep_resume, progress=progress,
            device=args.device, data_options=data_options,
        )
    except EdgecError as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    if result["rank"] == 0:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
