"""Elementwise add, sub, mul, div and neg, with NumPy broadcasting."""
from __future__ import annotations

from typing import Any

from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import shape_of, unbroadcast


class Add(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.shapes = shape_of(a), shape_of(b)
        return a + b

    def backward(self, g: Any) -> tuple[Any, Any]:
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


class Sub(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.shapes = shape_of(a), shape_of(b)
        return a - b

    def backward(self, g: Any) -> tuple[Any, Any]:
        return unbroadcast(g, self.shapes[0]), unbroadcast(-g, self.shapes[1])


class Mul(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.a, self.b = a, b
        return a * b

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.a, self.b
        return (
            unbroadcast(g * b, shape_of(a)) if self.needs_input_grad[0] else None,
            unbroadcast(g * a, shape_of(b)) if self.needs_input_grad[1] else None,
        )


class Div(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.a, self.b = a, b
        return a / b

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.a, self.b
        return (
            unbroadcast(g / b, shape_of(a)) if self.needs_input_grad[0] else None,
            unbroadcast(-g * a / (b * b), shape_of(b)) if self.needs_input_grad[1] else None,
        )


class Neg(Function):
    def forward(self, a: Any) -> Any:
        return -a

    def backward(self, g: Any) -> tuple[Any]:
        return (-g,)


def add(a: Any, b: Any) -> Any:
    """``a + b`` with broadcasting; either may be a Tensor, an array or a Python scalar."""
    return Add.apply(a, b)


def sub(a: Any, b: Any) -> Any:
    """``a - b`` with broadcasting."""
    return Sub.apply(a, b)


def mul(a: Any, b: Any) -> Any:
    """``a * b`` with broadcasting."""
    return Mul.apply(a, b)


def div(a: Any, b: Any) -> Any:
    """``a / b`` with broadcasting."""
    return Div.apply(a, b)


def neg(a: Any) -> Any:
    """``-a``."""
    return Neg.apply(a)
