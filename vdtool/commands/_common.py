"""Pieces the subcommands share: click parameter types, option groups,
output helpers.  Kept cheap to import (click and the standard library only),
because ``vdtool --help`` loads every command module; ops and formats are
imported inside the command callbacks."""

from __future__ import annotations

import re

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

FORMAT_NAMES = ("raw", "qcow2", "qcow", "qed", "vdi", "vmdk", "vhd", "vhdx", "parallels", "dmg")


# -- parameter types -----------------------------------------------------------

class SizeType(click.ParamType):
    """A size: bytes, or a number with a binary suffix (K M G T P E, KiB...)."""

    name = "size"

    def get_metavar(self, param, ctx=None):  # click >= 8.2 passes ctx
        return "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from vdtool.core.errors import UsageError
        from vdtool.core.sizes import parse_size

        try:
            return parse_size(value)
        except UsageError as e:
            self.fail(str(e), param, ctx)


class RelativeSizeType(click.ParamType):
    """SIZE, +SIZE or -SIZE (for resize); checked here, applied by the op."""

    name = "size"

    def get_metavar(self, param, ctx=None):
        return "[+|-]SIZE"

    def convert(self, value, param, ctx):
        from vdtool.core.errors import UsageError
        from vdtool.core.sizes import parse_size

        text = unhide_negative(str(value)).strip()
        try:
            parse_size(text[1:] if text[:1] in "+-" else text)
        except UsageError as e:
            self.fail(str(e), param, ctx)
        return text


class RangeType(click.ParamType):
    """OFFSET:LENGTH, both sizes."""

    name = "range"

    def get_metavar(self, param, ctx=None):
        return "OFFSET:LENGTH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from vdtool.core.errors import UsageError
        from vdtool.core.sizes import parse_size

        text = str(value)
        if ":" not in text:
            self.fail(f"range {text!r} is not OFFSET:LENGTH (for example 1M:64K)", param, ctx)
        off, length = text.split(":", 1)
        try:
            return parse_size(off), parse_size(length)
        except UsageError as e:
            self.fail(f"range {text!r}: {e}", param, ctx)


class FormatType(click.ParamType):
    """A format name; ``vpc`` is another name for ``vhd``.  Formats without a
    backend yet are accepted here and refused (exit 1) when used."""

    name = "format"

    def get_metavar(self, param, ctx=None):
        return "FMT"

    def convert(self, value, param, ctx):
        from vdtool.core import registry
        from vdtool.core.errors import UsageError

        try:
            return registry.canonical_name(value)
        except UsageError as e:
            self.fail(str(e), param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        from vdtool.core import registry

        # formats vdtool reads and writes today, not the ones it only recognises
        names = [*registry.implemented(), "vpc"]
        return [CompletionItem(n) for n in names if n.startswith(incomplete.lower())]


class UUIDType(click.ParamType):
    name = "uuid"

    def get_metavar(self, param, ctx=None):
        return "UUID"

    def convert(self, value, param, ctx):
        import uuid

        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            self.fail(f"{value!r} is not a UUID (expected the form 01234567-89ab-cdef-0123-456789abcdef)",
                      param, ctx)


SIZE = SizeType()
RELATIVE_SIZE = RelativeSizeType()
RANGE = RangeType()
FORMAT = FormatType()
UUID = UUIDType()


# -- negative sizes as arguments ------------------------------------------------

_NEG_MARK = "\x1fneg\x1f"
_NEG_SIZE_RE = re.compile(r"^-(\d+(\.\d*)?|\.\d+)\s*[a-zA-Z]*$")


def unhide_negative(text: str) -> str:
    return "-" + text[len(_NEG_MARK):] if text.startswith(_NEG_MARK) else text


class NegativeSizeCommand(click.Command):
    """A command whose positional arguments may look like short options
    (``-1G`` in ``vdtool resize disk.qcow2 -1G --shrink``).  Such tokens
    (before any ``--``) are kept away from the option parser and handed to
    the argument's type unchanged."""

    def parse_args(self, ctx, args):
        out = []
        literal = False
        for a in args:
            if a == "--":
                literal = True
            elif not literal and _NEG_SIZE_RE.match(a):
                a = _NEG_MARK + a[1:]
            out.append(a)
        return super().parse_args(ctx, out)


# -- shared options ----------------------------------------------------------------

def _compose(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def format_option(help_text: str = "Format of the input image (default: probed from its content, never "
                                   "from its name)."):
    return click.option("-f", "--format", "fmt", type=FORMAT, default=None, help=help_text)


def image_options(f):
    """--parent-search and --untrusted: every command that opens images."""
    return _compose(
        click.option("--parent-search", "parent_search", multiple=True, metavar="DIR",
                     type=click.Path(file_okay=False, dir_okay=True),
                     help="Another folder to look in for parent images (repeatable); used for parents "
                          "named only by UUID or by a name that is not found beside the child."),
        click.option("--untrusted", is_flag=True, envvar="VDTOOL_UNTRUSTED", show_envvar=True,
                     help="For images from untrusted sources: refuse an image whose content probes as "
                          "more than one format (or as another format than -f names), that references any "
                          "other file (backing or external data file, VMDK extent in another file, VHD, VMDK "
                          "or VDI parent) or that carries unknown feature bits; the error names the rule "
                          "and lists every external reference found."),
    )(f)


def force_share_option(f):
    return click.option("-U", "--force-share", "force_share", is_flag=True,
                        help="Read the image even when another process (QEMU or vdtool) holds it for "
                             "writing (read-only use only; what is read may be inconsistent). Without it, "
                             "vdtool takes and tests QEMU's lock bytes on every image file.")(f)


PROGRESS_MODES = ("bar", "qemu", "json")
PROGRESS_ENV = "VDTOOL_PROGRESS"


def _keep_progress_mode(ctx, param, value):
    if value:
        ctx.meta["vdtool.progress_mode"] = value
    return value


def progress_options(f):
    return _compose(
        click.option("-p", "--progress", "show_progress", is_flag=True,
                     help="Show progress on stderr even when stderr is not a terminal (then as qemu-img "
                          "-p prints it: (NN.NN/100%)). --progress=json: one JSON object a line "
                          "(op, done, total, percent, rate, eta, elapsed), also VDTOOL_PROGRESS=json. "
                          "SIGUSR1 prints one progress line at any time."),
        # --progress=MODE arrives here (vdtool.cli rewrites it: click's flags take no value)
        click.option("--progress-mode", type=click.Choice(PROGRESS_MODES), hidden=True, expose_value=False,
                     callback=_keep_progress_mode),
        click.option("-q", "--quiet", is_flag=True,
                     help="Print nothing but errors (no progress, no confirmation)."),
    )(f)


def force_open_option(f):
    return click.option("--force", "force", is_flag=True,
                        help="Open images anyway when a parent's UUID/CID/modification UUID does not match "
                             "what the child recorded, or a checksum is wrong but the data is readable.")(f)


def output_option(f):
    return click.option("--output", "output", type=click.Choice(["text", "json"]), default="text",
                        show_default=True,
                        help="Report format: human-readable text, or one JSON document on stdout with "
                             "qemu-img's key names.")(f)


def _complete_variant(ctx, param, incomplete):
    """The variants of the format named so far (-f/-O, else the file's
    extension), or of every format."""
    from click.shell_completion import CompletionItem

    from vdtool.core import registry
    from vdtool.core.errors import VdError

    fmt = ctx.params.get("out_fmt") or ctx.params.get("fmt")  # convert: -O; create: -f
    path = ctx.params.get("file") or ctx.params.get("dst")
    names = [fmt] if fmt else [registry.format_for_extension(path)] if path else []
    names = [n for n in names if n] or registry.implemented()
    out = []
    for name in names:
        try:
            variants = registry.get_backend(name).variants
        except VdError:
            continue
        out += [v for v in variants if v.lower().startswith(incomplete.lower()) and v not in out]
    return [CompletionItem(v) for v in out]


def create_options(f):
    """Options shared by create and convert for the new image."""
    return _compose(
        click.option("--variant", metavar="VARIANT", shell_complete=_complete_variant,
                     help="Image variant: raw sparse, full; qcow2 sparse, metadata, full (preallocation); "
                          "vdi dynamic, fixed; vmdk monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, "
                          "twoGbMaxExtentFlat, streamOptimized; vhd and vhdx dynamic, fixed. "
                          "Default: the format's first (sparse/dynamic) variant."),
        click.option("--block-size", "block_size", type=SIZE, default=None,
                     help="Block (cluster, grain) size of the new image, where the format has one "
                          "(default: the format's own)."),
        click.option("-b", "--parent", "parent", metavar="FILE",
                     help="Make the new image an overlay (differencing image) over FILE; its name is "
                          "recorded relative to the new image where possible."),
        click.option("-F", "--parent-format", "parent_format", type=FORMAT, default=None,
                     help="Format of the parent image (default: probed)."),
        click.option("-o", "options", multiple=True, metavar="KEY=VALUE",
                     help="A format option (repeatable, or comma-separated: -o compat=1.1,lazy_refcounts=on). "
                          "'-o help' lists the options of the chosen format and exits."),
        click.option("--force", is_flag=True, help="Overwrite the destination if it exists."),
    )(f)


# -- checks and output ---------------------------------------------------------------



def wants_option_help(options) -> bool:
    for item in options or ():
        for part in str(item).split(","):
            if part.strip() in ("help", "?"):
                return True
    return False


def print_format_options(fmt: str) -> None:
    """``-o help``: the options of ``fmt`` with type, default and help."""
    from vdtool.core import registry

    backend = registry.get_backend(fmt)
    name = getattr(backend, "name", fmt) or fmt
    lines = []
    variants = tuple(getattr(backend, "variants", ()) or ())
    if variants:
        lines.append(f"Variants of {name} (--variant): {variants[0]} (default)"
                     + "".join(f", {v}" for v in variants[1:]))
    options = tuple(getattr(backend, "options", ()) or ())
    if not options:
        lines.append(f"The {name} format has no -o options.")
    else:
        lines.append(f"Supported options for {name} (-o KEY=VALUE, repeatable or comma-separated):")
        for o in options:
            tname = _type_name(o.type)
            head = f"  {o.name}=<{tname}>"
            extra = []
            if o.choices:
                extra.append("choices: " + ", ".join(str(c) for c in o.choices))
            extra.append(f"default: {_default_text(o.default, o.type)}")
            text = (o.help or "").rstrip(".") + f" ({'; '.join(extra)})"
            if len(head) < 30:
                lines.append(f"{head:<30}{text}")
            else:
                lines.append(head)
                lines.append(" " * 30 + text)
    click.echo("\n".join(lines))


def _type_name(t) -> str:
    if t == "size":
        return "size"
    if t is bool:
        return "on|off"
    if t is int:
        return "int"
    return "str"


def _default_text(value, t) -> str:
    if value is None:
        return "none"
    if t is bool or isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def say(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(text)


def warn(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(f"vdtool: warning: {text}", err=True)


def print_json(doc) -> None:
    import json

    click.echo(json.dumps(doc, indent=4))


def long_operation(label: str, *, quiet: bool, show_progress: bool):
    """The Progress context for an op: progress on stderr as asked (-p,
    --progress=MODE, VDTOOL_PROGRESS), SIGUSR1 reports, and a Ctrl-C or
    SIGTERM that stops the op at its next safe point."""
    import os

    from vdtool.progressbar import operation

    ctx = click.get_current_context(silent=True)
    mode = ctx.meta.get("vdtool.progress_mode") if ctx is not None else None
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode is None and env in PROGRESS_MODES:
        mode = env
    op = ctx.info_name if ctx is not None and ctx.info_name else label.lower()
    return operation(label, quiet=quiet, force=show_progress, mode=mode, op=op)

