"""The `gedistill` command line. Each command lives in its stage module; heavy imports stay inside stage one."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.omp import shorten_spin

# Before any stage module imports torch: libgomp reads its environment once, when torch loads it (pipeline/omp.py).
SPIN_SET, OMP_DECISION = shorten_spin()

import typer  # noqa: E402

from pipeline.errors import UsageError  # noqa: E402
from stages.prepare import prepare  # noqa: E402
from stages.retrieve import retrieve  # noqa: E402
from stages.cache import app as cache_app  # noqa: E402
from stages.teacher_dump import teacher_dump  # noqa: E402
from stages.teacher_tune import teacher_tune  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.train_student import student_train  # noqa: E402

if SPIN_SET and "torch" in sys.modules:  # libgomp has read it: this process only, so that children (vLLM's
    os.environ.pop("GOMP_SPINCOUNT", None)  # engine, Ray's workers) start from the user's environment

app = typer.Typer(help="Generative embedding distillation: LLM teacher decisions -> SASRec student.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command("prepare")(prepare)
app.command("student-train")(student_train)
app.command("evaluate")(evaluate)
app.command("retrieve")(retrieve)
app.command("teacher-dump")(teacher_dump)
app.command("teacher-tune")(teacher_tune)
app.add_typer(cache_app, name="cache")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger(__name__).debug(OMP_DECISION)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors exit with code 2 and a message that says what to do."""
    # typer vendors its own click; its exceptions are the ones raised here.
    from typer import Abort
    from typer._click.exceptions import ClickException

    try:
        # With standalone_mode=False click returns the code of a `typer.Exit(n)` instead of exiting:
        # dropping it made `gedistill cache verify` exit 0 on a corrupted store.
        rc = app(args=argv, standalone_mode=False)
    except UsageError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except ClickException as e:  # bad option values, missing files: usage errors
        e.show()
        sys.exit(2)
    except OSError as e:
        # A full disk, a read-only folder, a directory where a file belongs: the user can fix these,
        # and a traceback would hide the one line that says which path. -v logs the traceback.
        logging.getLogger(__name__).debug("OS error", exc_info=True)
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror or e}{where}; check that the path is right, writable and has free space",
                   err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; completed outputs are kept, rerun to continue", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    main()
