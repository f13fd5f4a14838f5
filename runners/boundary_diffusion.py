"""The command line's front end: parsed flags -> ``Settings`` (checked before the model loads) -> one
engine call (``runners.engine.Engine.run``) -> what the run wrote, printed."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

from runners.engine import (Engine, EngineOptions, RunResult, UserError, check_job, default_batch_size,
                            distributed_process, latent_cache_root, load_config, load_model, local_device,
                            pick_device, process_group, retain_freed_memory)
from runners.settings import Settings, check_serve_flags, resolve_settings

log = logging.getLogger(__name__)

#: Modes that split their images across the processes of a torchrun job (docs/distributed.md).
SHARDED_MODES = ("boundary_search", "edit_image_boundary")


def _print_search(summary: dict) -> None:
    names = [summary["attribute"]] if "attribute" in summary else list(summary["attributes"])
    if "within" in summary:
        print(f"fitted within the {summary['within']['dimensions']} directions of {summary['within']['folder']}")
    for source, fitted in summary.get("region", {}).items():
        print(f"fitted on the region {source} alone ({fitted['coverage']['mean']:.1%} of each image on average): "
              + ", ".join(fitted["attributes"]))
    for name in names:
        spaces = summary["spaces"] if "attribute" in summary else summary["attributes"][name]
        for space, fit in spaces.items():
            print(f"boundary {space}{'' if len(names) == 1 else ' ' + name}: {fit['path']}  "
                  f"train acc {fit['train_acc']:.3f}  test acc {fit['test_acc']:.3f}")
    if "attributes" in summary:
        skipped = summary.get("skipped") or {}
        print(f"atlas of {len(names)} attributes: atlas.json and atlas.png in the run folder"
              + (f"; skipped (too few training images of a class): {', '.join(skipped)}" if skipped else ""))


def report(settings: Settings, result: RunResult) -> None:
    """What a finished run says on standard output."""
    summary = result.summary
    if settings.mode == "boundary_search":
        _print_search(summary)
    elif settings.mode == "edit_image_boundary" and "n_edited" in summary:
        failed = summary["failed"]
        print(f"edited {summary['n_edited']} images into one folder each and wrote contact_sheet.png"
              + (f"; {len(failed)} failed: {', '.join(Path(f).name for f in failed)}" if failed else ""))
    elif settings.mode == "edit_image_boundary":
        print(f"wrote {summary['n_written']} edits and grid.png")
    elif settings.mode == "unconditional":
        print(f"wrote {settings.job.n_samples} edit sequence(s)")
    elif settings.mode == "discover":
        for line in summary["names"]:
            print(line)
        print(f"wrote {summary['n_directions']} directions (z and h) to {settings.job.boundary_dir}"
              + (" and contact_sheet.png" if summary["contact_sheet"] else ""))
    else:
        print(summary["table"])
        print(f"mixing step t_m = {summary['t_m']} (largest t with relative radius difference <= "
              f"{settings.job.epsilon})")
        if summary.get("t0"):
            t0 = summary["t0"]
            print(t0["table"])
            recommended = t0["recommended"]
            print(f"recommended t_0 for {t0['attribute']}: {recommended['t_0']} ({recommended['rule']})"
                  + (f"; {recommended['versus_t_m']}" if recommended["versus_t_m"] else ""))
    print(f"results in {result.folder}")


def run_mode(args: argparse.Namespace) -> int:
    """Run the mode of a parsed command line (not --serve); the exit status."""
    config = load_config(args.config)
    # torchrun (RANK, WORLD_SIZE, ... set): one process group, one device per local rank. Else a single process.
    process = distributed_process(os.environ)
    device = local_device(pick_device(args.device), process)
    settings = resolve_settings(args, config, default_batch_size(device, config.data.image_size))
    if process.world_size > 1 and settings.mode not in SHARDED_MODES:
        raise UserError(f"--{settings.mode} does not run across processes; start it with python main.py, not "
                        f"torchrun (modes that do: {', '.join('--' + m for m in SHARDED_MODES)})")
    check_job(settings.job, config)  # the images, the data set and its labels, before the model loads
    with process_group(process, device, timedelta(seconds=settings.run.dist_timeout)):
        model = load_model(config, settings.run.model_path, settings.run.cache_dir, device, settings.run.precision)
        log.info("model %s from %s (sha256 %s...), %s", config.name, model.checkpoint, model.checkpoint_sha256[:12],
                 settings.run.precision)
        engine = Engine(model, EngineOptions(latent_cache_root(settings.run.cache_dir, settings.run.no_cache),
                                             show_progress=process.is_main, process=process))
        result = engine.run(settings.job, settings.run.exp, settings.run.overwrite, settings.to_dict())
    if result.folder is None:  # another rank's share is written
        return 0
    report(settings, result)
    failed = result.summary.get("failed") or {}
    if failed:  # a folder run keeps the others' results
        names = ", ".join(Path(p).name for p in failed)
        print(f"error: {len(failed)} image(s) could not be edited: {names}", file=sys.stderr)
        return 1
    return 0


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a parsed command line: the web app with --serve (after refusing the flags it does not
    use), else the mode's run. The exit status; errors are raised (main.py reports them)."""
    retain_freed_memory()  # large activations are reused, not page-faulted in again at every call
    if not args.serve:
        return run_mode(args)
    check_serve_flags(args, parser)
    from runners.app import serve

    return serve(args, load_config(args.config), pick_device(args.device))
