"""Data in and out: reading exports, validation, patient outcomes and instruments, safe CSV."""
