"""What every torchshrink command shares: the consoles, the one-line error wrapper, the progress bar
and option checks (so command modules need not import the app, nor the app them, but to register)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from torchshrink.core.errors import TorchshrinkError

out = Console()
err = Console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors a user can cause: one line on stderr, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TorchshrinkError as e:
            # escaped: a message quoting a path or a shape ("[samples, features]") is text, not rich markup
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted (an interrupted `compress` continues with --resume; other commands wrote nothing)")
            raise typer.Exit(130) from None

    return wrapper


def positive(flag: str, value: int | None) -> None:
    """A count option (--threads, --batch) must be 1 or more when given."""
    from torchshrink.core.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{flag} {value}: must be a whole number of 1 or more (leave it out for the default)")


DATA_HELP = ("your data: an image folder (CLASS/*.png, or train/ + val/), a .csv (label column) or .npz table, "
             "a .txt / .jsonl text file, or package.module:factory; 20% is held out for evaluation")
TRUST_HELP = "allow model files that run code when read (a torch.export .pt2 is unpickled); only for files you trust"


def progress_bar() -> tuple[Progress, Callable[[str, int, int], None]]:
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, transient=False)
    ids: dict[str, Any] = {}

    def update(desc: str, done: int, total: int) -> None:
        if desc not in ids:
            ids[desc] = bar.add_task(desc, total=max(total, 1))
        bar.update(ids[desc], completed=done, total=max(total, 1))

    return bar, update
