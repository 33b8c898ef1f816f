"""The host menu's entries for each VM's programs (SPEC §9.3), rendered for ``vmsilo install``.

For every VM, the entries its image keeps beside itself (:mod:`vmsilo.image.desktop`),
filtered by ``vms.<vm>.desktopEntries``, become (paths relative to the install root):

- ``usr/local/share/applications/vmsilo-<vm>-<id>.desktop``: ``Name=<Name> (<vm>)``,
  ``Exec=vm-run --detach <vm> <the entry's Exec without field codes>`` (``vm-run -t`` for a
  ``Terminal=true`` entry, which keeps ``Terminal=true``), the icon below, and the one
  category ``X-vmsilo-<vm>`` that puts it in the VM's menu folder and nowhere else;
- ``usr/local/share/desktop-directories/vmsilo-<vm>.directory`` and
  ``etc/xdg/menus/applications-merged/vmsilo-<vm>.menu``: the VM's folder in the XDG menu;
- ``usr/local/share/icons/hicolor/64x64/apps/vmsilo-<vm>-<id>.png``: the entry's icon redrawn
  with a border in the VM's colour (Pillow; a plain tile where the image had no PNG).

A VM whose image has no menu entries (or none selected) gets no files at all. The files go
through the install manifest like the units, so a reinstall rewrites what changed and removes
what no longer exists (a VM or an entry taken out of the config).

Desktop file syntax (the Desktop Entry Specification): values are strings with ``\\s \\n \\t
\\r \\\\`` escapes; ``Exec`` arguments with reserved characters are double-quoted with ``"``,
`````, ``$`` and ``\\`` backslash-escaped inside, and a literal ``%`` is ``%%``.
"""

from __future__ import annotations

import io
from pathlib import Path

from vmsilo.errors import VmsiloError
from vmsilo.host.desktop_rules import hex_color
from vmsilo.image.desktop import icon_of, image_entries, read_entry, select_entries
from vmsilo.plan.model import Plan, VmPlan

APPS_DIR = "usr/local/share/applications"
DIRECTORY_DIR = "usr/local/share/desktop-directories"
MENU_DIR = "etc/xdg/menus/applications-merged"
ICON_SIZE = 64
ICON_DIR = f"usr/local/share/icons/hicolor/{ICON_SIZE}x{ICON_SIZE}/apps"
#: The border's width in pixels, of the 64-pixel icon.
BORDER = 6
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")
_FIELD_CODES = set("fFuUdDnNickvm")


# ------------------------------------------------------------------ Exec and string values


def unescape_string(value: str) -> str:
    """A desktop file string value with its ``\\`` escapes resolved."""
    out, i = [], 0
    table = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in table:
            out.append(table[value[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def escape_string(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    )


def split_exec(exec_value: str) -> list[str]:
    """The arguments of an (unescaped) ``Exec`` value, with field codes dropped: an argument
    that is only a field code goes, ``%%`` becomes ``%``, other codes inside an argument go."""
    args: list[str] = []
    current: list[str] = []
    has_arg = False
    i, quoted = 0, False
    while i < len(exec_value):
        c = exec_value[i]
        if quoted:
            if c == "\\" and i + 1 < len(exec_value) and exec_value[i + 1] in '"`$\\':
                current.append(exec_value[i + 1])
                i += 2
                continue
            if c == '"':
                quoted = False
            else:
                current.append(c)
        elif c == '"':
            quoted, has_arg = True, True
        elif c in " \t\n":
            if has_arg or current:
                args.append("".join(current))
            current, has_arg = [], False
        else:
            current.append(c)
        i += 1
    if quoted:
        raise ValueError("unterminated quote")
    if has_arg or current:
        args.append("".join(current))
    out = []
    for arg in args:
        if len(arg) == 2 and arg[0] == "%" and arg[1] in _FIELD_CODES:
            continue
        out.append(_drop_codes(arg))
    return out


def _drop_codes(arg: str) -> str:
    out, i = [], 0
    while i < len(arg):
        if arg[i] == "%" and i + 1 < len(arg):
            if arg[i + 1] == "%":
                out.append("%")
            i += 2
            continue
        out.append(arg[i])
        i += 1
    return "".join(out)


def quote_exec_arg(arg: str) -> str:
    """One ``Exec`` argument as the spec wants it (before string escaping)."""
    arg = arg.replace("%", "%%")
    if arg and not (set(arg) & _RESERVED):
        return arg
    inner = "".join("\\" + c if c in '"`$\\' else c for c in arg)
    return f'"{inner}"'


def menu_exec(vm: str, argv: list[str], terminal: bool) -> str:
    """The host entry's ``Exec`` value (string-escaped)."""
    words = ["vm-run", "-t" if terminal else "--detach", vm, *argv]
    return escape_string(" ".join(quote_exec_arg(w) for w in words))


# ------------------------------------------------------------------ the files


def entry_name(vm: VmPlan, entry_id: str) -> str:
    return f"vmsilo-{vm.name}-{entry_id}"


def render_entry(vm: VmPlan, entry_id: str, text: str) -> str:
    """The host's ``.desktop`` file for entry ``entry_id`` (the guest's file ``text``)."""
    keys = read_entry(text)
    try:
        argv = split_exec(unescape_string(keys.get("Exec", "")))
    except ValueError:
        argv = []
    if not argv:
        raise VmsiloError(
            f"vms.{vm.name}.desktopEntries: {entry_id}: its Exec= cannot be read",
            f"leave {entry_id} out of desktopEntries",
        )
    terminal = keys.get("Terminal", "false").lower() == "true"
    name = unescape_string(keys.get("Name", entry_id))
    lines = [
        "[Desktop Entry]",
        "Type=Application",
        "Version=1.0",
        f"Name={escape_string(f'{name} ({vm.name})')}",
    ]
    for key in ("GenericName", "Comment"):
        if keys.get(key):
            lines.append(f"{key}={keys[key]}")
    lines += [
        f"Exec={menu_exec(vm.name, argv, terminal)}",
        f"Icon={entry_name(vm, entry_id)}",
        f"Terminal={'true' if terminal else 'false'}",
        f"Categories=X-vmsilo-{vm.name};",
        f"X-vmsilo-VM={vm.name}",
    ]
    return "\n".join(lines) + "\n"


def render_directory(vm: VmPlan) -> str:
    return "\n".join(
        ["[Desktop Entry]", "Type=Directory", "Version=1.0", f"Name={vm.name} (vmsilo)", ""]
    )


def render_menu(vm: VmPlan) -> str:
    return f"""<!DOCTYPE Menu PUBLIC "-//freedesktop//DTD Menu 1.0//EN"
 "http://www.freedesktop.org/standards/menu-spec/1.0/menu.dtd">
<!-- Generated by vmsilo install: the programs of VM {vm.name} -->
<Menu>
  <Name>Applications</Name>
  <Menu>
    <Name>vmsilo-{vm.name}</Name>
    <Directory>vmsilo-{vm.name}.directory</Directory>
    <Include>
      <Category>X-vmsilo-{vm.name}</Category>
    </Include>
  </Menu>
</Menu>
"""


def render_icon(source: Path | None, color: str) -> bytes:
    """A 64×64 PNG: the entry's icon inside a border of ``color`` (a plain tile without one)."""
    from PIL import Image, ImageColor, ImageDraw

    rgb = ImageColor.getrgb(hex_color(color))
    canvas = Image.new("RGBA", (ICON_SIZE, ICON_SIZE), (*rgb[:3], 255))
    inner = ICON_SIZE - 2 * BORDER
    ImageDraw.Draw(canvas).rectangle(
        (BORDER, BORDER, ICON_SIZE - BORDER - 1, ICON_SIZE - BORDER - 1), fill=(255, 255, 255, 255)
    )
    if source is not None:
        try:
            with Image.open(source) as img:
                art = img.convert("RGBA")
                art.thumbnail((inner, inner), Image.Resampling.LANCZOS)
        except (OSError, ValueError):
            art = None
        if art is not None:
            offset = (BORDER + (inner - art.width) // 2, BORDER + (inner - art.height) // 2)
            canvas.alpha_composite(art, offset)
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False)
    return out.getvalue()


def vm_menu_files(plan: Plan, vm: VmPlan) -> dict[str, str | bytes]:
    """The files of ``vm``'s menu folder (none if its image offers no selected entries)."""
    image = plan.images[vm.image]
    version = Path(image.current)
    if not version.is_dir():
        if vm.desktop_entries:
            raise VmsiloError(
                f"vms.{vm.name}.desktopEntries: image {vm.image} is not built",
                f"build it first: vmsilo image build {vm.image}",
            )
        return {}
    available = image_entries(version)
    chosen = select_entries(vm.name, vm.image, vm.desktop_entries, list(available))
    files: dict[str, str | bytes] = {}
    for entry_id in chosen:
        name = entry_name(vm, entry_id)
        text = available[entry_id].read_text(errors="replace")
        files[f"{APPS_DIR}/{name}.desktop"] = render_entry(vm, entry_id, text)
        files[f"{ICON_DIR}/{name}.png"] = render_icon(icon_of(version, entry_id), vm.color)
    if files:
        files[f"{DIRECTORY_DIR}/vmsilo-{vm.name}.directory"] = render_directory(vm)
        files[f"{MENU_DIR}/vmsilo-{vm.name}.menu"] = render_menu(vm)
    return files


def render_menu_files(plan: Plan) -> dict[str, str | bytes]:
    """Every VM's menu files, by path relative to the install root."""
    files: dict[str, str | bytes] = {}
    for vm in plan.vms.values():
        files.update(vm_menu_files(plan, vm))
    return files
