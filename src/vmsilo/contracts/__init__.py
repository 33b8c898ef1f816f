"""vmsilo.contracts: what host and guest must spell the same way, spelled once (level 0).

* :mod:`.ports` — virtio port names and the vsock port;
* :mod:`.cmdline` — the kernel command line: encoded by the plan, decoded by the guest init;
* :mod:`.guest_files` — the files the image builder copies into the guest;
* :mod:`.fs` — the atomic file write every writer of state files uses;
* :mod:`.mount` — libc ``mount``/``umount2`` through ctypes;
* :mod:`.spawn` — starting a child with PID-1-safe signal dispositions (guest init).

Standard library only, and no module here imports another vmsilo package: the guest image
copies these files (see :mod:`.guest_files`) and the lowest levels of the host import them.
"""
