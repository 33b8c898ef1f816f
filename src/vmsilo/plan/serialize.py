"""The plan as JSON (``vmsilo plan --json`` and the plan snapshot taken at VM start).

Keys are camelCase like the config. The document is the stable interface other tools read:
``{"vms": {NAME: {...}}, ...}``; fields are only ever added.
"""

from __future__ import annotations

from typing import Any

from vmsilo.plan.model import InterfacePlan, Plan, VmPlan, render_kv_value


def plan_to_json(plan: Plan, only: str | None = None) -> dict[str, Any]:
    vms = [plan.vms[only]] if only is not None else list(plan.vms.values())
    return {
        "user": {
            "name": plan.user.name,
            "uid": plan.user.uid,
            "gid": plan.user.gid,
            "home": plan.user.home,
        },
        "stateDir": plan.state_dir,
        "runtimeDir": plan.runtime_dir,
        "netvmRange": plan.netvm_range,
        "links": [
            {
                "client": link.client,
                "netvm": link.netvm,
                "subnet": link.subnet,
                "gateway": link.gateway,
                "clientAddress": link.client_address,
                "bridge": link.bridge,
                "pinned": link.pinned,
            }
            for link in plan.links
            if only is None or only in (link.client, link.netvm)
        ],
        "vms": {vm.name: vm_to_json(vm) for vm in vms},
    }


def _iface(i: InterfacePlan) -> dict[str, Any]:
    return {
        "name": i.name,
        "ifIndex": i.if_index,
        "pciAddress": i.pci_address,
        "mac": i.mac,
        "tap": i.tap,
        "hostAddress": i.host_address,
        "bridge": i.bridge,
        "dhcp": i.dhcp,
        "addresses": list(i.addresses),
        "v6Addresses": list(i.v6_addresses),
        "routes": [{"dest": r.dest, "via": r.via} for r in i.routes],
        "v6Routes": [{"dest": r.dest, "via": r.via} for r in i.v6_routes],
        "injectedFor": i.injected_for,
    }


def vm_to_json(vm: VmPlan) -> dict[str, Any]:
    gpu = vm.gpu
    return {
        "id": vm.id,
        "hypervisor": vm.hypervisor,
        "memory": vm.memory,
        "cpus": vm.cpus,
        "color": vm.color,
        "image": vm.image,
        "kernel": vm.kernel,
        "initramfs": vm.initramfs,
        "interfaces": [_iface(i) for i in vm.interfaces],
        "kernelParams": list(vm.kernel_params),
        "disks": [
            {
                "role": d.role,
                "path": d.path,
                "readOnly": d.read_only,
                "id": d.block_id,
                "options": {k: render_kv_value(v) for k, v in d.options},
            }
            for d in vm.disks
        ],
        "shares": [
            {
                "tag": s.tag,
                "hostPath": s.host_path,
                "mountPoint": s.mount_point,
                "readOnly": s.read_only,
                "socket": s.socket,
            }
            for s in vm.shares
        ],
        "gpu": None
        if gpu is None
        else {
            "wayland": gpu.wayland,
            "opengl": gpu.opengl,
            "vulkan": gpu.vulkan,
            "waylandSocket": gpu.wayland_socket,
            "filterSocket": gpu.filter_socket,
            "waypipeSocket": gpu.waypipe_socket,
            "controlSocket": gpu.control_socket,
            "contextTypes": list(gpu.context_types),
        },
        "sound": {
            "playback": vm.sound.playback,
            "capture": vm.sound.capture,
            "explicit": vm.sound.explicit,
        },
        "pciDevices": [
            {"bdf": d.bdf, "sysfsPath": d.sysfs_path, "options": dict(d.options)}
            for d in vm.pci_devices
        ],
        "vhostUser": [dict(v.options) for v in vm.vhost_user],
        "rootOverlay": {"type": vm.root_overlay, "size": vm.root_overlay_size},
        "autoShutdownAfter": vm.auto_shutdown_after,
        "fastStart": vm.fast_start,
        "nameservers": list(vm.nameservers),
        "netvm": vm.netvm,
        "isNetvm": vm.is_netvm,
        "netvmClients": list(vm.netvm_clients),
        "startTimeout": vm.start_timeout,
        "stopTimeout": vm.stop_timeout,
        "logLevel": vm.log_level,
        "extraArgs": list(vm.extra_args),
        "extraRunArgs": list(vm.extra_run_args),
        "paths": {_camel(k): v for k, v in vm.paths.as_dict().items()},
        "units": {"service": vm.service_unit, "socket": vm.socket_unit},
        "notApplied": list(vm.not_applied),
        "desktopEntries": None if vm.desktop_entries is None else list(vm.desktop_entries),
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)
