"""The Wayland filter (SPEC §9.1): a wire-protocol proxy between a VM's Wayland clients and the
host compositor, run as the desktop user.

Level 3 and standard-library only (it runs as the user with Debian's interpreter): ``protocol``
reads the message signatures from the protocol XML, ``wire`` encodes and decodes messages,
``policy`` says what a VM may see and how its windows are labelled, ``session`` applies it to one
client connection (pure, no sockets), ``proxy`` moves bytes and fds, ``security_context``
registers the proxy's upstream connections where the compositor offers it.
"""
