"""The exceptions of this package: one base class, one subclass per kind of problem a user can cause.

Each subclasses the built-in exception that code written before them caught (ValueError, OSError), so those
`except` clauses keep working; the message says what was wrong and what to do. `quote` and `one_line` build the
parts of that text that come from a file, a server or a user; `warn_at_caller` issues the package's warnings.
"""

import difflib
import functools
import inspect
import os
import sys
import warnings


class M2BertError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(M2BertError, ValueError):
    """A config that does not describe a supported M2-BERT model, or a config argument that cannot be read."""


class InputError(M2BertError, ValueError):
    """Inputs a model or pipeline cannot take: wrong shape, empty, too long, wrong options."""


class InputTypeError(InputError, TypeError):
    """An input or a model of the wrong type (a TypeError too, as Python's own would be)."""


class QuantizationError(M2BertError, ValueError):
    """Quantization settings MLX cannot apply, or a quantized folder this package did not write."""


class CheckpointError(M2BertError, ValueError):
    """A checkpoint file that cannot be read: corrupt, truncated, unsafe or of an unsupported kind."""


class WeightsMismatchError(M2BertError, ValueError):
    """The checkpoint's tensors do not fit the model: missing, unexpected or mis-shaped weights."""


class TokenizerError(M2BertError, ValueError):
    """A tokenizer that cannot be read, or that does not fit the model."""


class HubError(M2BertError, OSError):
    """A Hub request that failed: missing repo or revision, offline without a cache, unreachable Hub, refused
    upload (bad token, no write access)."""


class TrainingError(M2BertError, ValueError):
    """Training that cannot go ahead as asked; the message says what to change."""


class ConvertError(M2BertError, ValueError):
    """A conversion that cannot go ahead as asked; the message says what to change."""


class BackendUnavailableError(M2BertError, RuntimeError):
    """A long-convolution back end that was asked for and that this machine or this MLX build cannot run."""


class BlasLoadError(M2BertError, ImportError):
    """The CBLAS library that M2BERT_BLAS names cannot be loaded (an ImportError: it happens at import)."""


class OutputFileError(M2BertError, OSError):
    """A file this package was asked to write that cannot be written."""


class LongConvKernelError(M2BertError, RuntimeError):
    """A long-convolution kernel failed to build or computed a wrong result, and its back end was forced."""


class CompileError(M2BertError, RuntimeError):
    """mx.compile failed on the encoder, and M2BERT_COMPILE=1 forbids running it uncompiled."""


class DistributedError(M2BertError, RuntimeError):
    """Ranks of a distributed run that cannot go on together: they differ, or one died or stopped answering."""


class ArgumentError(M2BertError, TypeError):
    """A keyword argument that the function or pipeline does not take (a TypeError, as Python's own would be)."""


def did_you_mean(name, accepted, end=""):
    """The hint "did you mean 'x'?", then `end`, for the accepted name x closest to `name` (a likely misspelling of
    it, in any case: `MLM` for `mlm`); empty when none is close."""
    spelling = {}
    for known in sorted(accepted):
        spelling.setdefault(known.lower(), known)
    close = difflib.get_close_matches(str(name).lower(), sorted(spelling), n=1, cutoff=0.6)
    return f"did you mean {spelling[close[0]]!r}?{end}" if close else ""


def check_keywords(where, given, accepted):
    """Refuse the first name of `given` that is not in `accepted`, suggesting the closest accepted one."""
    accepted = sorted(accepted)
    for name in given:
        if name not in accepted:
            hint = did_you_mean(name, accepted) or f"it takes {', '.join(accepted)}."
            raise ArgumentError(f"{where} got an unknown keyword argument {name!r}: {hint}")


def checked_keywords(function):
    """Make an unknown keyword argument of `function` an ArgumentError that names the closest accepted one."""
    parameters = inspect.signature(function).parameters.values()
    accepted = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        check_keywords(f"{function.__name__}()", kwargs, accepted)
        return function(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# Error text


def quote(value, limit=80):
    """`value` as error text shows it when it comes from a file or a user: strings as their repr (so newlines and
    escape sequences stay visible and a crafted name cannot fake a line of output), cut to `limit` characters;
    numbers and short lists of them as written; anything else by its type."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, (int, float, str)) for v in value):
        items = ", ".join(quote(v, limit // 4) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    return f"a {type(value).__name__}"


def one_line(text, limit=1000):
    """Error text for a terminal: line breaks and other control characters shown escaped, cut at `limit`
    characters, so that every error is one line and no text from a file or a server can move the cursor."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def first_line(error):
    """An exception in a few words, for a message that names a failure it recovers from: its type and the first
    line of its text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Warnings

_PACKAGE_FOLDER = os.path.dirname(__file__) + os.sep


def _skipped(filename):
    # The package's own frames, and those of the import system (as warnings.warn skips them) between the package's
    # import-time code and the import statement that ran it.
    return filename.startswith(_PACKAGE_FOLDER) or ("importlib" in filename and "_bootstrap" in filename)


def warn_at_caller(message, category):
    """warnings.warn(message, category), attributed to the nearest line outside this package and the import system:
    the caller's call of the model or function, or their import statement. A fixed stacklevel would name a line of
    the package as soon as more or fewer of its frames lay in between."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _skipped(frame.f_code.co_filename):
        frame = frame.f_back
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__", "<string>"),
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )
