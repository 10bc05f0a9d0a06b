"""The kernel lab: tests that need a full Linux kernel run under Debian's kernel in QEMU.

The API is `e2e.kernellab.run.run_in_lab`; see README.md here.
"""
