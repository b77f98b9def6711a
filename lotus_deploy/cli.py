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
    """Turn recipe and run errors into a message on stderr and exit code 2 (no traceback)."""
    from .pipeline import RunError
    from .recipe import RecipeError

    try:
        yield
    except RecipeError as e:
        click.echo(f"{len(e.problems)} problem(s) in {e.source}:", err=True)
        for p in e.problems:
            click.echo("  " + p.format(e.source), err=True)
        sys.exit(2)
    except (RunError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lotus-deploy", prog_name="lotus")
def main() -> None:
    """lotus: prune, soup, lottery fine-tune, 2:4 and export pretrained ViTs for NVIDIA GPUs."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE and report every problem at once (exit code 2 when invalid)."""
    with _user_errors():
        from .recipe import load_recipe

        r = load_recipe(recipe, list(overrides))
    click.echo(f"{recipe}: ok ({len(r.stages)} stages: {', '.join(s.name for s in r.stages)})")


@main.command()
def schema() -> None:
    """Print the JSON Schema of recipes."""
    from .recipe import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="run directory (default runs/<name>)")
@click.option("--resume", is_flag=True, help="continue the run in the directory at its first unfinished stage")
@click.option("--force", is_flag=True, help="start over in a directory that already holds a run")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or console log (run.log is still written)")
def compress(recipe: Path, out: Path | None, resume: bool, force: bool, overrides: tuple[str, ...], quiet: bool) -> None:
    """Run every stage of RECIPE into runs/<name>/ (or --out)."""
    with _user_errors():
        from .pipeline import compress as run_compress
        from .recipe import load_recipe

        r = load_recipe(recipe, list(overrides))
        run_dir = run_compress(r, out=out, resume=resume, force=force, quiet=quiet)
    report = run_dir / "bench" / "report.md"
    click.echo(f"run: {run_dir}" + (f"\nreport: {report}" if report.exists() else ""))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--variant", default="final", show_default=True, help="model state to export (final, dense, a stage name)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="output folder (default RUN/export)")
def export(run: Path, variant: str, out: Path | None) -> None:
    """Export a run's model to ONNX, checked against PyTorch on eval images."""
    with _user_errors():
        from .pipeline import Run
        from .stages.export import export_state

        state = Run(run).state(variant)
        metrics, arts = export_state(state, out or run / "export")
    click.echo(f"onnx: {arts['onnx']}  max|diff| {metrics['max_abs_diff']:.2e}  top-1 agreement {100 * metrics['top1_agreement']:.1f}%")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", help="comma-separated batch sizes (default: the recipe's)")
@click.option("--variants", help="comma-separated variants (default: the recipe's)")
@click.option("--backends", help="comma-separated backends (default: the recipe's)")
@click.option("--iters", type=int, help="timed iterations per batch size")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="output folder (default RUN/bench)")
def bench(run: Path, batch: str | None, variants: str | None, backends: str | None, iters: int | None, out: Path | None) -> None:
    """Accuracy and latency of a run's variants on each backend; writes report.json and report.md."""
    with _user_errors():
        from .bench import run_bench
        from .pipeline import Run

        r = Run(run)
        cfg = r.recipe.bench.model_copy()
        if batch:
            cfg.batch_sizes = [int(b) for b in batch.split(",")]
        if variants:
            cfg.variants = variants.split(",")
        if backends:
            cfg.backends = backends.split(",")
        if iters:
            cfg.iters = iters
        out = out or run / "bench"
        run_bench(r, cfg, out, log=lambda m: click.echo(m, err=True))
    click.echo(f"report: {out / 'report.md'}")


if __name__ == "__main__":  # pragma: no cover
    main()
