//! Python bindings (`cortex._core`): thin wrappers that convert arguments, call the core
//! with the GIL released, and convert results and errors. Logic belongs in the core.

mod convert;
mod engine;
mod errors;
mod hub;
mod model;
mod sampling;
mod server;
mod tokenizer;

use pyo3::prelude::*;

pub(crate) use errors::run_detached;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A child forked after generating gets an error, not a hang (crate::threads).
    crate::threads::register_fork_handler();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyProgress>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<sampling::PySamplingParams>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyEngineStream>()?;
    m.add_class::<engine::PyEvent>()?;
    m.add_class::<engine::PyCompletion>()?;
    engine::add_defaults(m)?;
    m.add_class::<server::PyServer>()?;
    server::add_defaults(m)?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    m.add_function(wrap_pyfunction!(model::load_model, m)?)?;
    m.add_function(wrap_pyfunction!(model::load_tokenizer, m)?)?;
    m.add_function(wrap_pyfunction!(model::time_operation, m)?)?;
    m.add_function(wrap_pyfunction!(model::kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(model::amx_min_rows, m)?)?;
    m.add_function(wrap_pyfunction!(model::amx_available, m)?)?;
    m.add_function(wrap_pyfunction!(model::allow_amx, m)?)?;
    m.add_function(wrap_pyfunction!(model::cuda_compiled, m)?)?;
    m.add_function(wrap_pyfunction!(model::cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(model::cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(model::profile, m)?)?;
    m.add_function(wrap_pyfunction!(engine::stream, m)?)?;
    m.add_function(wrap_pyfunction!(engine::engine_stats, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert, m)?)?;
    convert::add_constants(m)?;
    m.add_function(wrap_pyfunction!(convert::affine_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(hub::hub_snapshot_download, m)?)?;
    m.add_function(wrap_pyfunction!(hub::hub_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(errors::_error_samples, m)?)?;
    Ok(())
}
