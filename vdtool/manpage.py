"""Man pages from the click commands: one source of truth for --help and man/.

    python -m vdtool.manpage man/          # regenerate man/vdtool.1, man/vdtool-*.1

Each command's docstring becomes DESCRIPTION, its options OPTIONS (with
click's own help records: defaults, env vars), and each ``\\b`` block of its
epilog that starts with a ``Title:`` line its own section (EXAMPLES, EXIT
STATUS).  The output is deterministic (no dates), so a test can regenerate the
pages and compare them with the committed ones."""

from __future__ import annotations

import os
import sys

import click

from vdtool import __version__


# -- roff helpers ------------------------------------------------------------------

def _esc(text: str) -> str:
    """Escape text for roff: backslashes, hyphens (as minus), leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return text


def _line(text: str) -> str:
    text = _esc(text)
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _paragraphs(text: str) -> list:
    """Split help text into paragraphs: ('fill', text) or ('verbatim', [lines])."""
    text = (text or "").split("\f")[0]
    out = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        if lines and lines[0].strip() == "\b":
            body = [ln for ln in lines[1:]]
            if body:
                out.append(("verbatim", body))
        else:
            words = " ".join(ln.strip() for ln in lines if ln.strip())
            if words:
                out.append(("fill", words))
    return out


def _render_paragraphs(paras) -> list:
    lines = []
    for kind, body in paras:
        if kind == "fill":
            lines += [".PP", _line(body)]
        else:
            lines += [".PP", ".nf", ".RS 4"]
            lines += [_line(_dedent(ln, body)) for ln in body]
            lines += [".RE", ".fi"]
    return lines


def _dedent(line: str, block: list) -> str:
    indent = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
    return line[indent:] if len(line) >= indent else line.strip()


def _epilog_sections(epilog: str):
    """Epilog blocks: ``\\b`` blocks whose first line ends with ':' start a
    section named by that line; other paragraphs join the current one."""
    sections = []  # (title, [paragraphs])
    for kind, body in _paragraphs(epilog or ""):
        if kind == "verbatim" and body[0].rstrip().endswith(":") and not body[0].startswith(" "):
            title = body[0].strip().rstrip(":").upper()
            rest = body[1:]
            sections.append((title, [("verbatim", rest)] if rest else []))
        elif sections:
            sections[-1][1].append((kind, body))
        else:
            sections.append(("NOTES", [(kind, body)]))
    return sections


# -- pages --------------------------------------------------------------------------

def _context(cmd: click.Command, name: str, parent: click.Context | None) -> click.Context:
    return click.Context(cmd, info_name=name, parent=parent, **(cmd.context_settings or {}))


def _options_section(cmd: click.Command, ctx: click.Context) -> list:
    lines = []
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record  # e.g. ("-f, --format FMT", "Format of ...")
        flags = []
        meta = ""
        for piece in names.split(", "):
            name, _, m = piece.partition(" ")
            flags.append(name)
            if m:
                meta = m
        head = ", ".join(f"\\fB{_esc(f)}\\fR" for f in flags)
        if meta:
            head += f" \\fI{_esc(meta)}\\fR"
        lines += [".TP", head, _line(" ".join(help_text.split()))]
    return lines


def render_command(cmd: click.Command, name: str, group: click.Group, group_ctx: click.Context) -> str:
    ctx = _context(cmd, name, group_ctx)
    full = f"vdtool {name}"
    title = f"vdtool-{name}".upper()
    short = (cmd.get_short_help_str(limit=200) or "").rstrip(".")
    lines = [f'.TH "{title}" "1" "" "vdtool {__version__}" "vdtool manual"',
             ".SH NAME", f"vdtool\\-{_esc(name)} \\- {_esc(short)}",
             ".SH SYNOPSIS", f".B {_esc(full)}", _line(" ".join(cmd.collect_usage_pieces(ctx))),
             ".SH DESCRIPTION"]
    lines += _render_paragraphs(_paragraphs(cmd.help or ""))
    lines += [".SH OPTIONS"] + _options_section(cmd, ctx)
    for sec_title, paras in _epilog_sections(cmd.epilog or ""):
        lines += [f".SH {_esc(sec_title)}"] + _render_paragraphs(paras)
    lines += [".SH SEE ALSO", "\\fBvdtool\\fR(1)"]
    return "\n".join(lines) + "\n"


def render_group(group: click.Group, ctx: click.Context) -> str:
    lines = [f'.TH "VDTOOL" "1" "" "vdtool {__version__}" "vdtool manual"',
             ".SH NAME", "vdtool \\- " + _esc((group.get_short_help_str(limit=200) or "").rstrip(".")
                                              .split(": ", 1)[-1]),
             ".SH SYNOPSIS", ".B vdtool", _line(" ".join(group.collect_usage_pieces(ctx))),
             ".SH DESCRIPTION"]
    lines += _render_paragraphs(_paragraphs(group.help or ""))
    lines += [".SH OPTIONS"] + _options_section(group, ctx)
    lines += [".SH COMMANDS"]
    names = group.list_commands(ctx)
    envvars = {}
    for name in names:
        cmd = group.get_command(ctx, name)
        short = (cmd.get_short_help_str(limit=200) or "")
        lines += [".TP", f"\\fBvdtool {_esc(name)}\\fR",
                  _line(f"{short} See ") + f"\\fBvdtool\\-{_esc(name)}\\fR(1)."]
        sub_ctx = _context(cmd, name, ctx)
        for param in cmd.get_params(sub_ctx):
            if isinstance(param, click.Option) and param.envvar and param.show_envvar:
                envvars.setdefault(param.envvar, (param, name))
    for param in group.get_params(ctx):
        if isinstance(param, click.Option) and param.envvar and param.show_envvar:
            envvars.setdefault(param.envvar, (param, None))
    if envvars:
        lines += [".SH ENVIRONMENT"]
        for var in sorted(envvars):
            param, _ = envvars[var]
            flag = max(param.opts, key=len)
            lines += [".TP", f"\\fB{_esc(var)}\\fR",
                      _line(f"Set to 1 for {flag} (on every command that has it): "
                            + " ".join((param.help or "").split()))]
    for sec_title, paras in _epilog_sections(group.epilog or ""):
        lines += [f".SH {_esc(sec_title)}"] + _render_paragraphs(paras)
    lines += [".SH SEE ALSO",
              ",\n".join(f"\\fBvdtool\\-{_esc(n)}\\fR(1)" for n in names) + ",",
              "\\fBqemu\\-img\\fR(1)"]
    return "\n".join(lines) + "\n"


def render_all() -> dict:
    """{file name: roff text} for vdtool.1 and every vdtool-COMMAND.1."""
    from vdtool.cli import main as group

    ctx = _context(group, "vdtool", None)
    pages = {"vdtool.1": render_group(group, ctx)}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        pages[f"vdtool-{name}.1"] = render_command(cmd, name, group, ctx)
    return pages


def write_pages(folder: str) -> list:
    os.makedirs(folder, exist_ok=True)
    written = []
    for fname, text in render_all().items():
        path = os.path.join(folder, fname)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m vdtool.manpage FOLDER   (writes vdtool.1 and vdtool-COMMAND.1 there)",
              file=sys.stderr)
        return 2
    for path in write_pages(argv[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
