"""What a VM's Wayland clients may see (SPEC §9.1) and how its windows are labelled.

The globals are an **allowlist**: a global reaches a VM only when its interface is listed here
*and* its signatures are known (an interface the filter cannot parse cannot be relayed). The
forbidden list is not what enforces anything; it names what must never appear, for the tests and
for a reader checking that no entry of it slipped into the allowlist.

Clipboard, primary selection and drag-and-drop (§9.1 item 3): the compositor's data device and
primary selection device never speak to the VM — the session drops every event of theirs (no
offer, selection or drag of the host or another VM reaches the VM, so it cannot read one) and
``start_drag``, and kills a client that talks to an offer it was never shown. The VM's
``set_selection`` (of either kind) goes to the VM's own selection of that kind in the filter
(:mod:`.clipboard`), which the filter offers to the VM's focused clients itself: copy and paste,
and middle-click paste, work between the VM's programs; ``vm-clipboard`` (§9.4) is the only way
across, for the clipboard only. ``gtk_primary_selection_device_manager`` (GTK's older copy of the
same protocol, the toolkits' fallback where the ``zwp_`` one is missing) stays hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        # core
        "wl_compositor",
        "wl_subcompositor",
        "wl_shm",
        "wl_seat",
        "wl_output",
        "wl_data_device_manager",  # hollow: see the module docstring
        "zwp_primary_selection_device_manager_v1",  # hollow too
        # shells and window decorations
        "xdg_wm_base",
        "zxdg_decoration_manager_v1",
        "zxdg_output_manager_v1",
        # buffers, scaling, timing
        "wp_viewporter",
        "wp_fractional_scale_manager_v1",
        "wp_presentation",
        "zwp_linux_dmabuf_v1",
        "wp_single_pixel_buffer_manager_v1",
        "zwp_linux_explicit_synchronization_v1",
        "wp_content_type_manager_v1",
        "wp_tearing_control_manager_v1",
        # input that stays with the focused window
        "wp_cursor_shape_manager_v1",
        "zwp_text_input_manager_v3",
        "zwp_relative_pointer_manager_v1",
        "zwp_pointer_constraints_v1",
        "zwp_pointer_gestures_v1",
        "zwp_tablet_manager_v2",
        "zwp_idle_inhibit_manager_v1",
    }
)

#: Never offered to a VM (SPEC §9.1 item 1, and the selection protocols of item 3).
FORBIDDEN_GLOBALS: frozenset[str] = frozenset(
    {
        # screen capture
        "zwlr_screencopy_manager_v1",
        "zwlr_export_dmabuf_manager_v1",
        "ext_image_copy_capture_manager_v1",
        "ext_output_image_capture_source_manager_v1",
        "ext_foreign_toplevel_image_capture_source_manager_v1",
        # clipboard managers and the selections of others
        "zwlr_data_control_manager_v1",
        "ext_data_control_manager_v1",
        "gtk_primary_selection_device_manager",
        # synthetic input
        "zwp_virtual_keyboard_manager_v1",
        "zwlr_virtual_pointer_manager_v1",
        # desktop shell roles and other windows
        "zwlr_layer_shell_v1",
        "zwlr_foreign_toplevel_manager_v1",
        "ext_foreign_toplevel_list_v1",
        "ext_session_lock_manager_v1",
        # outputs
        "zwlr_output_manager_v1",
        "zwlr_output_power_manager_v1",
        "zwlr_gamma_control_manager_v1",
        # input grabs
        "zwp_input_method_manager_v2",
        "zwp_input_method_v1",
        "zwlr_input_inhibit_manager_v1",
        "zwp_keyboard_shortcuts_inhibit_manager_v1",
        "zwp_xwayland_keyboard_grab_manager_v1",
        # idle
        "ext_idle_notifier_v1",
        "org_kde_kwin_idle",
        # other clients' surfaces
        "zxdg_exporter_v1",
        "zxdg_exporter_v2",
        "zxdg_importer_v1",
        "zxdg_importer_v2",
        "xwayland_shell_v1",
        # the sandbox itself
        "wp_security_context_manager_v1",
    }
)

#: ``wl_data_device`` requests that would carry something of the VM out (dropped; the VM's
#: ``set_selection`` goes to its own clipboard in the filter instead).
DROPPED_REQUESTS: frozenset[tuple[str, str]] = frozenset({("wl_data_device", "start_drag")})
#: Interfaces whose events never reach the VM; objects they announce stay hidden.
SILENCED_INTERFACES: frozenset[str] = frozenset(
    {"wl_data_device", "zwp_primary_selection_device_v1"}
)

#: Longest title the filter relays (bytes of UTF-8, the prefix included): a message is ≤ 4 KiB.
MAX_TITLE = 1024
SANDBOX_ENGINE = "org.vmsilo"


@dataclass(frozen=True, slots=True)
class Labels:
    """How one VM's windows are named on the host."""

    vm: str
    color: str

    @property
    def app_id(self) -> str:
        return f"vmsilo:{self.vm}:{self.color}"

    @property
    def bare_title(self) -> str:
        return f"[{self.vm}]"

    def title(self, guest_title: bytes) -> bytes:
        """``[vm] t``, cut to :data:`MAX_TITLE` on a character boundary."""
        prefix = f"[{self.vm}] ".encode()
        room = MAX_TITLE - len(prefix)
        text = guest_title.decode("utf-8", "replace").replace("\0", "")
        raw = text.encode()
        if len(raw) > room:
            raw = raw[:room].decode("utf-8", "ignore").encode()
        return prefix + raw


def allowed(interface: str) -> bool:
    return interface in ALLOWED_GLOBALS and interface not in FORBIDDEN_GLOBALS
