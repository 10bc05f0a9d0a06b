"""The tiny TCG test guest: Debian's cloud kernel and a busybox initramfs printing a counter."""
