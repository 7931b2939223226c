"""Helpers shared by the examples: a progress bar and a median."""
import sys


def progress(step, total, text="", width=30, stream=sys.stdout):
    """One-line progress bar, redrawn in place; a newline at the last step."""
    done = int(width * step / max(total, 1))
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {text}")
    if step >= total:
        stream.write("\n")
    stream.flush()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]
