"""vmsilo.image: building guest images on the host (``vmsilo image build|list|gc``).

* :mod:`.build` — inputs, version hash and the build itself (mmdebstrap root, initramfs,
  erofs root with the guest code of :mod:`vmsilo.contracts.guest_files`);
* :mod:`.store` — the built versions on disk: listing and garbage collection;
* :mod:`.kernel` — the Debian kernel package: resolving, fetching, modules, vmlinux;
* :mod:`.cpio` — the newc cpio writer for the initramfs.

Nothing here is copied into the guest: :mod:`vmsilo.guest` holds what runs there.
"""
