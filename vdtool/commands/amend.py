"""vdtool amend"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, format_option, image_options,
                                     long_operation, progress_options, say, wants_option_help)

EPILOG = """\b
Examples:
  vdtool amend -o compat=0.10 disk.qcow2          # for old QEMU (expands zero clusters)
  vdtool amend -o compat=1.1,lazy_refcounts=on disk.qcow2
  vdtool amend -o refcount_bits=64 disk.qcow2     # rebuild the refcount structures
  vdtool amend -o adapter_type=lsilogic disk.vmdk # also sets the SCSI geometry
  vdtool amend -o hwversion=7 disk.vmdk
  vdtool amend -o uuid=3f2b7a4e-0c1d-4e5f-8a9b-0c1d2e3f4a5b disk.vdi
  vdtool amend -f qcow2 -o help                   # what can be amended

\b
What each format can change:
  qcow2  compat (0.10 or 1.1), lazy_refcounts (on|off), refcount_bits
         (1..64), size; as qemu-img amend, with the same refusals
  vmdk   adapter_type (ide, buslogic, lsilogic, legacyESX; the descriptor's
         geometry follows: 16 heads for ide, 255 for SCSI), hwversion
  vhd    uuid (a new unique ID; as VBoxManage internalcommands sethduuid)
  vdi    uuid (the image UUID), parent_uuid (the parent UUID recorded;
         as VBoxManage internalcommands sethduuid / sethdparentuuid)
  Children that recorded the old UUID of a VHD or VDI image no longer
  match it: open them with --force, or give them the new UUID (vdi
  parent_uuid=, or 'vdtool rebase -u').

\b
Exit status:
  0  the image was changed (or already had the values asked for)
  1  error: a bad or unknown option, a change the image refuses
     (qemu-img amend's refusals), the format has no amend
  2  usage error (also a malformed UUID)"""


@click.command("amend", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Change format options of an image in place.")
@format_option()
@click.option("-o", "options", multiple=True, metavar="KEY=VALUE[,KEY=VALUE...]",
              help="An option to change (repeatable, or comma-separated; a key given twice keeps the last "
                   "value). '-o help' lists what the format (from -f, or probed from IMAGE) can amend.")
@progress_options
@force_open_option
@image_options
@click.argument("image", metavar="IMAGE", type=click.Path(dir_okay=True), required=False)
def command(image, fmt, options, show_progress, quiet, force, parent_search, untrusted):
    """Change what the format of IMAGE lets change in place, as qemu-img
    amend does: same option names, same refusals, exit status 1 on error.

    The change is crash-safe: new structures are written and flushed before
    the header points at them, so an interrupted amend leaves the old image
    or the new one (leaked clusters at worst, which 'vdtool check -r leaks'
    frees).  The image is locked as QEMU locks images; one a running VM
    holds is refused."""
    if wants_option_help(options):
        _print_amend_options(fmt, image)
        return
    if image is None:
        raise click.UsageError("missing argument 'IMAGE'")
    from vdtool.core.ops import amend

    with long_operation("Amending", quiet=quiet, show_progress=show_progress) as progress:
        result = amend(image, options, fmt, force=force, untrusted=untrusted, progress=progress)
    changes = result["changes"]
    if not changes:
        say(quiet, f"'{image}': nothing to change")
    for c in changes:
        say(quiet, f"'{image}': {c['option']} {_text(c['old'])} -> {_text(c['new'])}")


def _text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _print_amend_options(fmt, image) -> None:
    from vdtool.core import registry
    from vdtool.core.errors import VdError

    if fmt is None:
        if image is None:
            raise VdError("-o help needs -f FMT or an IMAGE to name the format")
        fmt = registry.probe_format(image)
    backend = registry.get_backend(fmt)
    name = getattr(backend, "name", fmt) or fmt
    opts = tuple(getattr(backend, "amend_options", ()) or ())
    if not opts:
        raise VdError(f"the {name} format does not support option amendment")
    lines = [f"Amend options for {name} (-o KEY=VALUE, repeatable or comma-separated):"]
    for o in opts:
        tname = {bool: "on|off", int: "int", "size": "size"}.get(o.type, "str")
        head = f"  {o.name}=<{tname}>"
        text = o.help + (f" (choices: {', '.join(o.choices)})" if o.choices else "")
        lines.append(f"{head:<30}{text}" if len(head) < 30 else f"{head}\n{' ' * 30}{text}")
    click.echo("\n".join(lines))
