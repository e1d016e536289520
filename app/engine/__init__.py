"""The KVM x86 MMU model, usable as a library: `from app.engine import Vm`."""

from .capabilities import kvm_check_extension
from .errors import KvmError
from .ops import NAMES as OPS
from .ops import Op, parse
from .vm import Vm

__all__ = ["OPS", "KvmError", "Op", "Vm", "kvm_check_extension", "parse"]
