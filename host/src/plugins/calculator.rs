//! The calculator plugin: `calculator.v1.Calculator`, arithmetic on two
//! doubles.
//!
//! A result that is not a finite number is refused with `INVALID_ARGUMENT`
//! and a message naming the operation, its operands and the problem, rather
//! than returned as `inf` or `NaN`: a caller that gets a number back can
//! trust it.

use registry_proto::calculator::v1::calculator_server::{Calculator, CalculatorServer};
use registry_proto::calculator::v1::{BinaryRequest, Result as CalcResult};
use tonic::service::RoutesBuilder;
use tonic::{Request, Response, Status};

use crate::gate::{Gate, Switch};
use crate::plugin::{Plugin, PluginContext};

/// The calculator plugin.
#[derive(Debug, Clone, Copy, Default)]
pub struct CalculatorPlugin;

impl Plugin for CalculatorPlugin {
    fn name(&self) -> &'static str {
        "calculator"
    }

    fn proto_service(&self) -> &'static str {
        "calculator.v1.Calculator"
    }

    fn descriptors(&self) -> &'static [u8] {
        registry_proto::CALCULATOR_DESCRIPTORS
    }

    fn add_to(&self, routes: &mut RoutesBuilder, switch: Switch, _ctx: &PluginContext) {
        routes.add_service(Gate::new(CalculatorServer::new(CalculatorService), switch));
    }
}

/// The four operations, named as in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// a + b
    Add,
    /// a - b
    Subtract,
    /// a * b
    Multiply,
    /// a / b
    Divide,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Subtract => "subtract",
            Op::Multiply => "multiply",
            Op::Divide => "divide",
        }
    }
}

/// Computes `a op b`, or the `INVALID_ARGUMENT` status explaining why the
/// result would not be a finite number.
pub fn compute(op: Op, a: f64, b: f64) -> Result<f64, Status> {
    let refuse =
        |problem: &str| Status::invalid_argument(format!("{}(a={a}, b={b}): {problem}", op.name()));
    for (operand, value) in [("a", a), ("b", b)] {
        if !value.is_finite() {
            return Err(refuse(&format!(
                "operand {operand} is {value}, not a finite number"
            )));
        }
    }
    let value = match op {
        Op::Add => a + b,
        Op::Subtract => a - b,
        Op::Multiply => a * b,
        Op::Divide if b == 0.0 => return Err(refuse("division by zero")),
        Op::Divide => a / b,
    };
    if value.is_nan() {
        Err(refuse("the result is not a number"))
    } else if value.is_infinite() {
        Err(refuse(&format!("the result overflows to {value}")))
    } else {
        Ok(value)
    }
}

/// The tonic service implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct CalculatorService;

impl CalculatorService {
    fn answer(op: Op, req: Request<BinaryRequest>) -> Result<Response<CalcResult>, Status> {
        let BinaryRequest { a, b } = req.into_inner();
        let value = compute(op, a, b)?;
        Ok(Response::new(CalcResult { value }))
    }
}

#[tonic::async_trait]
impl Calculator for CalculatorService {
    async fn add(&self, req: Request<BinaryRequest>) -> Result<Response<CalcResult>, Status> {
        Self::answer(Op::Add, req)
    }

    async fn subtract(&self, req: Request<BinaryRequest>) -> Result<Response<CalcResult>, Status> {
        Self::answer(Op::Subtract, req)
    }

    async fn multiply(&self, req: Request<BinaryRequest>) -> Result<Response<CalcResult>, Status> {
        Self::answer(Op::Multiply, req)
    }

    async fn divide(&self, req: Request<BinaryRequest>) -> Result<Response<CalcResult>, Status> {
        Self::answer(Op::Divide, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn err(op: Op, a: f64, b: f64) -> String {
        let status = compute(op, a, b).expect_err("should be refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        status.message().to_string()
    }

    #[test]
    fn ordinary_arithmetic() {
        assert_eq!(compute(Op::Add, 2.0, 3.5).ok(), Some(5.5));
        assert_eq!(compute(Op::Subtract, 2.0, 3.5).ok(), Some(-1.5));
        assert_eq!(compute(Op::Multiply, -2.0, 3.5).ok(), Some(-7.0));
        assert_eq!(compute(Op::Divide, 7.0, 2.0).ok(), Some(3.5));
        assert_eq!(compute(Op::Divide, 0.0, 5.0).ok(), Some(0.0));
    }

    #[test]
    fn division_by_zero_names_operation_and_operands() {
        assert_eq!(
            err(Op::Divide, 1.0, 0.0),
            "divide(a=1, b=0): division by zero"
        );
        // -0.0 is zero too, and 0/0 must not sneak through as NaN.
        assert!(err(Op::Divide, 1.0, -0.0).contains("division by zero"));
        assert!(err(Op::Divide, 0.0, 0.0).contains("division by zero"));
    }

    #[test]
    fn overflow_to_infinity_is_refused() {
        let msg = err(Op::Multiply, 1e308, 10.0);
        assert!(msg.starts_with("multiply(a=100000000"), "{msg}");
        assert!(msg.contains("overflows to inf"), "{msg}");
        assert!(err(Op::Add, f64::MAX, f64::MAX).contains("overflows to inf"));
        assert!(err(Op::Subtract, -f64::MAX, f64::MAX).contains("overflows to -inf"));
        assert!(err(Op::Divide, 1e308, 1e-308).contains("overflows"));
    }

    #[test]
    fn non_finite_operands_are_refused() {
        assert_eq!(
            err(Op::Add, f64::NAN, 1.0),
            "add(a=NaN, b=1): operand a is NaN, not a finite number"
        );
        assert!(err(Op::Subtract, 1.0, f64::INFINITY).contains("operand b is inf"));
        assert!(err(Op::Multiply, f64::NEG_INFINITY, 0.0).contains("operand a is -inf"));
    }

    #[test]
    fn tiny_results_are_fine() {
        // Underflow to zero or subnormals is a finite number: answered.
        assert_eq!(compute(Op::Multiply, 1e-300, 1e-300).ok(), Some(0.0));
    }
}
