"""Human-readable plan (``vmsilo plan`` without ``--json``), drawn with rich."""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.table import Table

from vmsilo.plan.model import Plan


def print_plan(plan: Plan, only: str | None, out: TextIO) -> None:
    console = Console(file=out, highlight=False, soft_wrap=True, width=200)
    vms = [plan.vms[only]] if only else list(plan.vms.values())
    table = Table(title=f"vmsilo plan ({len(plan.vms)} VMs, user {plan.user.name})")
    for col in ("VM", "id", "hypervisor", "memory", "cpus", "netvm", "interfaces", "shares"):
        table.add_column(col)
    for vm in vms:
        table.add_row(
            f"[{vm.color}]{vm.name}[/]" if not vm.color.startswith("#") else vm.name,
            str(vm.id),
            vm.hypervisor,
            f"{vm.memory} MiB",
            str(vm.cpus),
            vm.netvm or ("(netvm)" if vm.is_netvm else "-"),
            ", ".join(f"{i.name}={i.tap}" for i in vm.interfaces) or "-",
            ", ".join(s.tag for s in vm.shares) or "-",
        )
    console.print(table)
    if only:
        vm = plan.vms[only]
        console.print("[bold]kernel parameters[/]")
        for p in vm.kernel_params:
            console.print(f"  {p}")
        console.print("[bold]disks[/]")
        for d in vm.disks:
            console.print(f"  {d.role}: {d.crosvm_kv}")
        console.print("[bold]runtime paths[/]")
        for k, v in vm.paths.as_dict().items():
            console.print(f"  {k}: {v}")
        if vm.not_applied:
            console.print("[bold]not applied under QEMU[/]: " + ", ".join(vm.not_applied))
