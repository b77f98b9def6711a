"""The ``lotus`` command line. Commands are thin: they parse, then import their work lazily."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import click

SET_HELP = "override a recipe field, typed by the schema: --set stages.1.sparsity=0.6 (repeatable)"


@contextmanager
def _user_errors():
    """Turn every error a user can fix into one line per problem on stderr and exit code 2.

    Recipe problems print ``file: field: problem``; run, input and file-system errors print
    ``error: ...`` naming the file. Ctrl-C exits 130 with a line saying how to go on. Under
    torchrun, ranks other than 0 put ``[rank N]`` in front of their lines.
    """
    from lotus_deploy.errors import LotusError
    from lotus_deploy.recipe import RecipeError

    try:
        yield
    except RecipeError as e:
        for p in e.problems:
            click.echo(p.format(e.source), err=True)
        sys.exit(2)
    except LotusError as e:
        click.echo(f"{_rank_prefix()}error: {_one_line(e)}", err=True)
        sys.exit(2)
    except OSError as e:  # missing, unreadable, read-only, full disk: the OS names the file
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"{_rank_prefix()}error: {where}{e.strerror or _one_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: finished stages are kept; continue with --resume", err=True)
        sys.exit(130)


def _latest() -> Path:
    """The most recently finished run under runs/, announced on stderr (for commands run without RUN)."""
    from lotus_deploy.run import latest_run

    run = latest_run("runs")
    click.echo(f"using the latest finished run: {run}", err=True)
    return run


def _rank_prefix() -> str:
    """``[rank N] `` on ranks other than 0 of a torchrun launch (their errors say where they come from), else empty."""
    import os

    rank = os.environ.get("RANK", "0")
    return "" if rank in ("", "0") or os.environ.get("WORLD_SIZE", "1") in ("", "1") else f"[rank {rank}] "


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + ("..." if len(text) > 500 else "")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lotus-deploy", prog_name="lotus")
@click.option("--verbose", "-v", is_flag=True, help="log debug messages too")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars, warnings and errors only")
def main(verbose: bool, quiet: bool) -> None:
    """lotus: prune, soup, lottery fine-tune, 2:4 and export pretrained ViTs for NVIDIA GPUs."""
    import logging

    if verbose or quiet:
        logging.getLogger("lotus").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if quiet:
        from lotus_deploy.progress import quiet_process

        quiet_process()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE and report every problem at once (exit code 2 when invalid)."""
    with _user_errors():
        from lotus_deploy.preflight import check_inputs
        from lotus_deploy.recipe import load_recipe

        r = load_recipe(recipe, list(overrides))
        check_inputs(r, str(recipe))
    click.echo(f"{recipe}: ok ({len(r.stages)} stage{'s' if len(r.stages) != 1 else ''}: {', '.join(s.name for s in r.stages)})")


@main.command()
def schema() -> None:
    """Print the JSON Schema of recipes."""
    from lotus_deploy.recipe import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="run directory (default runs/<name>)")
@click.option("--resume", is_flag=True, help="continue the run in the directory at its first unfinished stage")
@click.option("--force", is_flag=True, help="start over in a directory that already holds a run (what it wrote is removed)")
@click.option("--rerun-from", "rerun_from", metavar="STAGE", help="keep the finished stages before STAGE (name or number) and run it and the rest again")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or console log (run.log is still written)")
def compress(recipe: Path, out: Path | None, resume: bool, force: bool, rerun_from: str | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Run every stage of RECIPE into runs/<name>/ (or --out)."""
    if sum([resume, force, rerun_from is not None]) > 1:
        raise click.UsageError("use one of --resume, --rerun-from and --force")
    with _user_errors():
        from lotus_deploy.pipeline import compress as run_compress
        from lotus_deploy.preflight import check_inputs
        from lotus_deploy.recipe import load_recipe

        r = load_recipe(recipe, list(overrides))
        check_inputs(r, str(recipe), deep=True)
        run_dir = run_compress(r, out=out, resume=resume, force=force, quiet=quiet, rerun_from=rerun_from)
    if _rank_prefix():  # rank 0 says where the run is
        return
    report = run_dir / "bench" / "report.md"
    click.echo(f"run: {run_dir}" + (f"\nreport: {report}" if report.exists() else ""))


@main.command()
@click.argument("run", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--variant", default="final", show_default=True, help="model state to export (final, dense, initial, a stage name); must have finished, its checkpoint's sha256 is verified")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="output folder (default: RUN/export for the model the manifest records there, RUN/exports/<variant> for any other)")
@click.option("--trt", "build_trt", is_flag=True, help="also build a TensorRT engine (settings of the recipe's engine stage, else defaults; --precision replaces its precision); needs tensorrt and an NVIDIA GPU")
@click.option("--precision", help="fp32, fp16, bf16, int8 or fp8 (default: the recipe's export.precision): also write model.<precision>.onnx, "
              "converted by ModelOpt (int8/fp8 calibrated on train images) and checked against model.onnx on eval images; "
              "--trt then builds that precision. Needs the `precision` extra")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False, path_type=Path), help="also write a Triton model repository into DIR (the engine with --trt, else the ONNX of --precision)")
@click.option("--triton-name", help="Triton model name (default: the recipe's name)")
@click.option("--triton-version", type=click.IntRange(min=1), default=1, show_default=True, help="Triton model version folder")
@click.option("--force", is_flag=True, help="replace an existing Triton model version")
def export(run: Path | None, variant: str, out: Path | None, build_trt: bool, triton_dir: Path | None, precision: str | None,
           triton_name: str | None, triton_version: int, force: bool) -> None:
    """Export a run's model to ONNX, checked against PyTorch on eval images (and a converted precision, a TensorRT engine, a Triton repository).

    RUN defaults to the most recently finished run under runs/. Everything is checked before the
    first file is written: the variant finished and its checkpoint is intact, the packages of the
    exporter and the precision are installed, the Triton version is free (or --force).
    """
    with _user_errors():
        from lotus_deploy.export.extras import require_exporter
        from lotus_deploy.export.graph_precision import check_precision_name
        from lotus_deploy.export.precision import require_converter
        from lotus_deploy.run import Run
        from lotus_deploy.stages.export import export_dir, export_state
        from lotus_deploy.state import RunState

        try:
            precision = check_precision_name(precision) if precision else None
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        r = Run(run or _latest())
        require_exporter(r.recipe.export.dynamo)  # exit 2 naming the extra before any work
        if not build_trt:
            precision = precision or r.recipe.export.precision
            require_converter(precision)
        state = RunState.from_run(r, variant)  # refuses unfinished variants and changed checkpoints
        out = export_dir(r, variant, out)
        triton_name = triton_name or state.recipe.name
        if triton_dir:
            from lotus_deploy.export.triton import check_version

            check_version(triton_dir, triton_name, triton_version, force)
        if build_trt:
            from lotus_deploy.export.trt import TensorRTUnavailable
            from lotus_deploy.stages.engine import (
                build_for_state,
                engine_settings,
                prepare_engine,
            )

            cfg = engine_settings(state.recipe, precision)
            inputs = prepare_engine(cfg, state, out, precision=precision, suffix=f".{cfg.precision}")
            metrics, arts = inputs.metrics, inputs.artifacts
            _echo_export(metrics, arts)
            try:
                built, arts = build_for_state(cfg, state, inputs)
            except TensorRTUnavailable as e:
                click.echo(f"trtexec: {arts['trtexec']}")
                click.echo(f"error: {e}", err=True)
                sys.exit(2)
            click.echo(f"engine: {arts['engine']}  sidecar: {arts['engine_json']}  precision built: {built['precision']['built']}  TensorRT {built['tensorrt']}")
            model = arts["engine"]
        else:
            metrics, arts = export_state(state, out, precision)
            _echo_export(metrics, arts)
            model = arts.get(f"onnx_{precision}", arts["onnx"])
        if triton_dir:
            from lotus_deploy.export.triton import write_repository

            config = write_repository(model, triton_dir, triton_name, version=triton_version, force=force)
            click.echo(f"triton: {config}")


def _echo_export(metrics: dict, arts: dict) -> None:
    """The export's lines: the fp32 ONNX and its check, and the converted precision's check."""
    click.echo(f"onnx: {arts['onnx']}  max|diff| {metrics['max_abs_diff']:.2e}  top-1 agreement {100 * metrics['top1_agreement']:.1f}%")
    pm = metrics.get("precision")
    if pm:
        p = pm["precision"]
        click.echo(f"{p}: {arts[f'onnx_{p}']}  top-1 {pm['top1']:.2f}% (fp32 {pm['top1_fp32']:.2f}%)  agreement {100 * pm['top1_agreement']:.1f}%  "
                   f"max|diff| {pm['max_abs_diff']:.2e}  ({pm['runtime']})")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="labels per image")
@click.option("--variant", default="final", show_default=True, help="model of a run directory (final, dense, a stage name)")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="images decoded and run together")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (ONNX Runtime intra-op; torch for checkpoints)")
@click.option("--providers", help="comma-separated ONNX Runtime execution providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per image")
def predict(artifact: Path, images: tuple[Path, ...], top_k: int, variant: str, batch_size: int, threads: int | None,
            providers: str | None, as_json: bool) -> None:
    """Top-k labels of IMAGE files from ARTIFACT: a TensorRT engine, an ONNX file, a checkpoint or a run directory."""
    with _user_errors():
        from lotus_deploy.runtime import load

        if threads and artifact.suffix != ".onnx":
            import torch

            torch.set_num_threads(threads)
        predictor = load(artifact, variant=variant, threads=threads, providers=providers.split(",") if providers else None)
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for path, top in zip(chunk, predictor.classify(chunk, top_k=top_k, batch_size=batch_size)):
                if as_json:
                    click.echo(json.dumps({"image": str(path), "top": top}))
                else:
                    click.echo(f"{path}: " + "  ".join(f"{t['label']} {t['prob']:.3f}" for t in top))


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--batch", help="comma-separated batch sizes, e.g. 1,8,64 (default: the recipe's)")
@click.option("--variants", help="comma-separated variants: all, initial, dense, final, stage names (default: the recipe's)")
@click.option("--backends", help="comma-separated backends, auto or all (default: the recipe's)")
@click.option("--iters", type=click.IntRange(min=1), help="timed iterations per backend and batch size (at least)")
@click.option("--warmup", type=click.IntRange(min=0), help="untimed iterations first")
@click.option("--min-seconds", type=click.FloatRange(min=0), help="time each backend and batch for at least this long")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch and ONNX Runtime")
@click.option("--no-accuracy", is_flag=True, help="latency only (no eval passes)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="output folder (default RUN/bench; with two runs: where compare.md/.json go)")
def bench(runs: tuple[Path, ...], batch: str | None, variants: str | None, backends: str | None, iters: int | None,
          warmup: int | None, min_seconds: float | None, threads: int | None, no_accuracy: bool, out: Path | None) -> None:
    """Accuracy and latency of RUN's variants on each backend: RUN/bench/results.json, results.csv,
    report.md, pareto.png, sparsity.png.

    With two arguments (run folders or results.json files), compare them side by side: latency
    ratios B/A and top-1 differences; a run without results is benchmarked first.
    """
    if len(runs) > 2:
        raise click.UsageError("give one run to benchmark, or two runs / results files to compare")
    with _user_errors():
        runs = runs or (_latest(),)
        from lotus_deploy.bench.results import load_results
        from lotus_deploy.bench.run import run_bench
        from lotus_deploy.run import Run

        def bench_run(run: Path, where: Path) -> Path:
            from pydantic import ValidationError

            r = Run(run)
            cfg = r.recipe.bench.model_copy()
            try:
                if batch:
                    cfg.batch_sizes = [int(b) for b in batch.split(",")]
                if variants:
                    cfg.variants = variants.split(",")
                if backends:
                    cfg.backends = backends.split(",")
                for key, value in (("iters", iters), ("warmup", warmup), ("min_seconds", min_seconds), ("threads", threads)):
                    if value is not None:
                        setattr(cfg, key, value)
            except (ValueError, ValidationError) as e:
                raise click.UsageError(f"bench options: {e}".splitlines()[0] if not isinstance(e, ValidationError) else f"bench options: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
            if no_accuracy:
                cfg.accuracy = False
            run_bench(r, cfg, where, log=lambda m: click.echo(m, err=True))
            return where

        if len(runs) == 1:
            where = bench_run(runs[0], out or runs[0] / "bench")
            click.echo(f"report: {where / 'report.md'}")
            return
        from lotus_deploy.bench.report import compare, compare_markdown
        from lotus_deploy.files import write_json, write_text

        loaded = []
        for p in runs:
            if p.is_dir() and (p / "manifest.json").is_file() and not (p / "bench" / "results.json").is_file():
                bench_run(p, p / "bench")
            loaded.append(load_results(p))
        c = compare(*loaded)
        md = compare_markdown(c, f"A ({runs[0]})", f"B ({runs[1]})")
        if out:
            write_json(out / "compare.json", c)
            write_text(out / "compare.md", md)
    click.echo(md, nl=False)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--show", type=click.IntRange(min=1), default=16, show_default=True, help="training images in the grid")
@click.option("--stage", help="lottery_finetune stage name (default: the recipe's last one)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG path (default RUN/stages/NN_<stage>/tickets-N.png)")
def tickets(run: Path, show: int, stage: str | None, out: Path | None) -> None:
    """Draw a run's data lottery tickets: N training images with dropped patches greyed out."""
    with _user_errors():
        from lotus_deploy.stages.lottery import show_run_tickets

        path = show_run_tickets(run, show, out, stage)
    click.echo(f"tickets: {path}")


@main.command()
@click.argument("path", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
def inspect(path: Path | None, as_json: bool) -> None:
    """Per-layer shape, sparsity, 2:4 compliance and non-zeros of a checkpoint, run directory or .onnx
    (default: the most recently finished run under runs/)."""
    with _user_errors():
        path = path or _latest()
        from lotus_deploy.inspection import format_report, inspect_path

        rep = inspect_path(path)
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))


if __name__ == "__main__":  # pragma: no cover
    main()
