"""The KVM x86 MMU model, usable as a library: `from app.engine import Vm`."""

from .capabilities import kvm_check_extension
from .errors import KvmError
from .vm import OPS, Vm

__all__ = ["OPS", "KvmError", "Vm", "kvm_check_extension"]
