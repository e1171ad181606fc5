//! The registry of functions that can run in another process.
//!
//! Rust cannot send a closure to another process, so shoal uses the same-binary model: the
//! program that starts a process is also the worker, and a task names a function and carries its
//! encoded arguments. `#[shoal::remote]` adds each function to [`REMOTE_FUNCTIONS`], a
//! link-time slice (linkme): it is complete before `main` runs and needs no registration code at
//! startup, in binaries and test binaries alike.
//!
//! `#[shoal::remote] fn square` turns `square` into a [`Remote`] handle (a constant of the same
//! name that derefs to the function, so `square(3)` still calls it) and registers the function
//! under its full path (`my_app::jobs::square`), the name the handle carries. `Process`, `Pool`
//! and `Barrier` actions accept only such handles ([`RemoteFn`]): a plain function or a closure
//! is a compile error that says to add `#[shoal::remote]`, not a run-time
//! [`Error::NotRegistered`](crate::Error::NotRegistered). ([`Callable`] is any function value:
//! what `Process::thread` runs on a thread of this process.)
//!
//! A registered function is called through its [`Invoke`] entry: decode the argument tuple (the
//! next element of an [`ArrayReader`]), call, append the encoded result to an [`ArrayWriter`]
//! ([`Returned`]). A pool chunk's items are the elements of one array and its results the
//! elements of another, so an item costs its own decoding, call and encoding and nothing else:
//! the text of an error (which function, which arguments) is built only when something fails.
//! The whole return value is encoded, a `Result` included, so a pool hands `Result<T, E>` items
//! back as values. A function whose return type is spelled `Result<...>` also reports, when asked
//! (`describe_err`), whether it returned `Err` and the error's text ([`Returned::err`]): a
//! `Process`, whose return value goes nowhere, exits with code 1 then. A return value that is not
//! `Serialize` is reported as a [`Failure`] saying so (it matters only where the value is wanted:
//! pools). [`call`] (one argument payload) and [`call_element`] (the next item of a chunk) add
//! panic capture.

use std::collections::HashMap;
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use linkme::distributed_slice;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{ArrayReader, ArrayWriter};
use crate::error::TaskErrorKind;

/// Decodes the next argument tuple of `args`, calls the function, and appends its encoded return
/// value to `out` (elements larger than `limit` bytes are refused). With `describe_err`, a
/// function returning `Result` describes the `Err` it returned ([`Returned::err`]). `Err` when
/// the arguments do not decode.
pub type Invoke = fn(
    args: &mut ArrayReader<'_>,
    out: &mut ArrayWriter,
    limit: usize,
    describe_err: bool,
) -> Result<Returned, Failure>;

/// What a call returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Returned {
    /// `Ok` when the return value was appended to the output array, else why it could not be
    /// encoded (nothing was appended then).
    pub value: Result<(), Failure>,
    /// For a function returning `Result`, when asked: the text of the `Err` it returned.
    pub err: Option<String>,
}

impl Returned {
    /// The outcome as a process sees it: the value is discarded, an `Err` return is a failure.
    pub fn into_process_outcome(self) -> Result<(), Failure> {
        match self.err {
            Some(message) => Err(Failure::error(message)),
            None => Ok(()),
        }
    }
}

/// One function that `#[shoal::remote]` registered.
#[derive(Debug)]
pub struct RemoteFunction {
    /// The function's full path (computed, so it always matches [`RemoteFn::name`]).
    pub name: fn() -> &'static str,
    /// Runs the function on encoded arguments.
    pub invoke: Invoke,
}

/// Every function registered with `#[shoal::remote]` in this binary.
#[distributed_slice]
pub static REMOTE_FUNCTIONS: [RemoteFunction];

/// Module paths of `shoal::test_support!()` invocations in this binary. When one is present the
/// binary is a test binary, and a worker subprocess is started as the test named
/// `<module path without the crate>::shoal_worker_entry` instead of running every test.
#[distributed_slice]
pub static TEST_WORKER_ENTRIES: [&'static str];

/// The registered functions by name: `Ok` for a name one function registered, `Err(count)` for
/// a name several did (see [`crate::Error::AmbiguousFunction`]).
fn index() -> &'static HashMap<&'static str, Result<&'static RemoteFunction, usize>> {
    static INDEX: OnceLock<HashMap<&'static str, Result<&'static RemoteFunction, usize>>> =
        OnceLock::new();
    INDEX.get_or_init(|| {
        let mut index = HashMap::new();
        for function in REMOTE_FUNCTIONS.iter() {
            index
                .entry((function.name)())
                .and_modify(|entry| {
                    *entry = match entry {
                        Ok(_) => Err(2),
                        Err(count) => Err(*count + 1),
                    }
                })
                .or_insert(Ok(function));
        }
        index
    })
}

/// The registered function called `name`; `None` when no function, or more than one (see
/// [`resolve`]), registered it.
pub fn lookup(name: &str) -> Option<&'static RemoteFunction> {
    index().get(name).and_then(|entry| entry.ok())
}

/// The registered function called `name`, or why there is none to run:
/// [`crate::Error::NotRegistered`], or [`crate::Error::AmbiguousFunction`] when several
/// functions of this binary share the name.
pub fn resolve(name: &str) -> crate::Result<&'static RemoteFunction> {
    match index().get(name) {
        Some(Ok(function)) => Ok(function),
        Some(Err(count)) => Err(crate::Error::AmbiguousFunction {
            function: name.to_string(),
            count: *count,
        }),
        None => Err(crate::Error::NotRegistered {
            function: name.to_string(),
        }),
    }
}

/// The names of every registered function, sorted.
pub fn registered_names() -> Vec<&'static str> {
    let mut names: Vec<_> = REMOTE_FUNCTIONS.iter().map(|f| (f.name)()).collect();
    names.sort_unstable();
    names
}

/// The libtest name of the worker entry test, if this binary is a test binary that invoked
/// `shoal::test_support!()`.
pub fn test_worker_entry() -> Option<String> {
    TEST_WORKER_ENTRIES
        .first()
        .map(|module| match module.split_once("::") {
            Some((_crate, path)) => format!("{path}::shoal_worker_entry"),
            None => "shoal_worker_entry".to_string(),
        })
}

/// Why a remote call failed, as the worker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Panic, error, or (never produced by a worker itself) crash.
    pub kind: TaskErrorKind,
    /// What happened.
    pub message: String,
}

impl Failure {
    /// A failure of kind [`TaskErrorKind::Error`].
    pub fn error(message: impl Display) -> Self {
        Failure {
            kind: TaskErrorKind::Error,
            message: message.to_string(),
        }
    }
}

/// The error a worker gives for a function its program lacks: [`crate::Error::UnknownFunction`]
/// naming the function and this program ([`crate::Error::AmbiguousFunction`] when it has
/// several of that name).
pub fn unknown_here(function: &str) -> crate::Error {
    if let Err(ambiguous @ crate::Error::AmbiguousFunction { .. }) = resolve(function) {
        return ambiguous;
    }
    let program = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "this program".into());
    crate::Error::UnknownFunction {
        function: function.to_string(),
        program,
    }
}

/// Calls a registered function on one encoded argument tuple (a payload of its own), turning a
/// panic into a [`Failure`] of kind [`TaskErrorKind::Panic`] whose message is the panic's message
/// followed by where it happened (`boom at src/main.rs:10:5`). The return value is encoded and
/// dropped (what a process does with it); an `Err` return is described ([`Returned::err`]).
pub fn call(function: &RemoteFunction, args: &[u8], limit: usize) -> Result<Returned, Failure> {
    let mut reader = ArrayReader::single(args, limit, || {
        format!("arguments of {}", (function.name)())
    })
    .map_err(Failure::error)?;
    let mut out = ArrayWriter::new();
    catch_panic(|| (function.invoke)(&mut reader, &mut out, limit, true)).unwrap_or_else(Err)
}

/// Calls a registered function on the next item of a chunk: decodes it from `args`, appends the
/// result to `out`. A panic is a [`Failure`] of kind [`TaskErrorKind::Panic`] (as with
/// [`call`]); on any failure `out` is left as it was. A returned `Err` is a value here, not
/// described.
pub fn call_element(
    function: &RemoteFunction,
    args: &mut ArrayReader<'_>,
    out: &mut ArrayWriter,
    limit: usize,
) -> Result<(), Failure> {
    let mark = out.mark();
    let result = catch_panic(|| (function.invoke)(args, out, limit, false))
        .unwrap_or_else(Err)
        .and_then(|returned| returned.value);
    if result.is_err() {
        out.rewind(mark);
    }
    result
}

/// Runs `f`, turning a panic into a [`Failure`] of kind [`TaskErrorKind::Panic`] with the panic's
/// message and location.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, Failure> {
    install_location_hook();
    PANIC_LOCATION.with(|l| l.borrow_mut().take());
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let mut message = panic_message(payload.as_ref());
        if let Some(location) = PANIC_LOCATION.with(|l| l.borrow_mut().take()) {
            message.push_str(" at ");
            message.push_str(&location);
        }
        Failure {
            kind: TaskErrorKind::Panic,
            message,
        }
    })
}

thread_local! {
    /// Where the last panic on this thread happened, recorded by the hook below.
    static PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Chains a panic hook that records each panic's location for [`catch_panic`] before running
/// the hook that was installed (the default one prints the panic). Installed once; a hook the
/// application installs later replaces it, and panics are then reported without a location.
fn install_location_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(location) = info.location() {
                let text = format!(
                    "{}:{}:{}",
                    location.file(),
                    location.line(),
                    location.column()
                );
                // A panic during thread teardown must not panic again.
                let _ = PANIC_LOCATION.try_with(|l| *l.borrow_mut() = Some(text));
            }
            previous(info);
        }));
    });
}

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked with a non-string payload".to_string()
    }
}

/// Decodes a function's next argument tuple (used by `#[shoal::remote]`); the error names the
/// function (built only on failure). The size limit was checked on the whole payload.
pub fn decode_args<T: DeserializeOwned>(
    args: &mut ArrayReader<'_>,
    _limit: usize,
    function: &str,
) -> Result<T, Failure> {
    args.next(|| format!("arguments of {function}"))
        .map_err(Failure::error)
}

/// Wraps a return value for [`EncodeSerialize`]/[`EncodeFallback`] (used by
/// `#[shoal::remote]`): `(&&Encoded(&value)).encode_output(..)` encodes a `Serialize` value and
/// reports any other as a failure, chosen at compile time where the concrete type is known.
pub struct Encoded<'a, T>(pub &'a T);

/// Encodes a `Serialize` return value.
pub trait EncodeSerialize {
    /// Appends the value to `out`; the error names the function (built only on failure).
    fn encode_output(
        &self,
        out: &mut ArrayWriter,
        limit: usize,
        function: &str,
    ) -> Result<(), Failure>;
}

impl<T: Serialize> EncodeSerialize for &Encoded<'_, T> {
    fn encode_output(
        &self,
        out: &mut ArrayWriter,
        limit: usize,
        function: &str,
    ) -> Result<(), Failure> {
        out.push(self.0, limit, || format!("result of {function}"))
            .map_err(Failure::error)
    }
}

/// Reports a return value that is not `Serialize`.
pub trait EncodeFallback {
    /// A failure naming the type; nothing is appended.
    fn encode_output(
        &self,
        out: &mut ArrayWriter,
        limit: usize,
        function: &str,
    ) -> Result<(), Failure>;
}

impl<T> EncodeFallback for Encoded<'_, T> {
    fn encode_output(
        &self,
        _out: &mut ArrayWriter,
        _limit: usize,
        function: &str,
    ) -> Result<(), Failure> {
        Err(Failure::error(format!(
            "the result of {function} ({}) is not Serialize, so it cannot be sent back",
            std::any::type_name::<T>()
        )))
    }
}

/// Wraps an error for [`DescribeDisplay`]/[`DescribeDebug`]/[`DescribeOpaque`] (used by
/// `#[shoal::remote]`): `(&&Described(&e)).describe()` is `{:#}` for `Display` errors, `{:?}`
/// for `Debug` ones, and the type's name otherwise.
pub struct Described<'a, T>(pub &'a T);

/// Describes a `Display` error.
pub trait DescribeDisplay {
    /// The text.
    fn describe(&self) -> String;
}

impl<T: std::fmt::Display> DescribeDisplay for &Described<'_, T> {
    fn describe(&self) -> String {
        format!("{:#}", self.0)
    }
}

/// Describes a `Debug` error.
pub trait DescribeDebug {
    /// The text.
    fn describe(&self) -> String;
}

impl<T: std::fmt::Debug> DescribeDebug for &&Described<'_, T> {
    fn describe(&self) -> String {
        format!("{:?}", self.0)
    }
}

/// Describes any other error.
pub trait DescribeOpaque {
    /// The text.
    fn describe(&self) -> String;
}

impl<T> DescribeOpaque for Described<'_, T> {
    fn describe(&self) -> String {
        format!("returned Err({})", std::any::type_name::<T>())
    }
}

/// A function value called with its arguments as a tuple: every `FnOnce` of 0 to 8 arguments,
/// closures included, and the [`Remote`] handles.
pub trait Callable<Args>: Send + 'static {
    /// What the function returns.
    type Output;

    /// Calls the function in this process.
    fn call(self, args: Args) -> Self::Output;
}

/// A function that can run in another process: a handle made by `#[shoal::remote]`. Only such
/// handles are accepted where the function may run elsewhere (`Process::new`, the `Pool`'s
/// calls and initializer, `Barrier::with_action`); a plain function or a closure does not
/// compile there (the `shoal` crate's docs show it).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a `#[shoal::remote]` function",
    label = "only a function marked `#[shoal::remote]` can run in another process",
    note = "add `#[shoal::remote]` to the function's definition; a closure cannot be sent to \
            another process (`Process::thread` runs one on a thread of this process)"
)]
pub trait RemoteFn<Args>: Callable<Args> {
    /// The name the registry knows the function by (its full path).
    fn name(&self) -> &'static str;
}

/// The handle `#[shoal::remote]` makes of a function: its registered name and the function.
/// It derefs to the function, so the function can still be called in this process
/// (`square(3)`, or `*square` where a function value is wanted).
pub struct Remote<F> {
    name: &'static str,
    function: F,
}

impl<F: Copy> Clone for Remote<F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: Copy> Copy for Remote<F> {}

impl<F> std::fmt::Debug for Remote<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Remote").field(&self.name).finish()
    }
}

impl<F> std::ops::Deref for Remote<F> {
    type Target = F;

    fn deref(&self) -> &F {
        &self.function
    }
}

impl<F> Remote<F> {
    /// The handle of `function`, registered as `name` (used by `#[shoal::remote]`).
    #[doc(hidden)]
    pub const fn __new(name: &'static str, function: F) -> Self {
        Remote { name, function }
    }

    /// The function's registered name (its full path).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

macro_rules! impl_callable {
    ($($arg:ident),*) => {
        impl<Func, Ret, $($arg),*> Callable<($($arg,)*)> for Func
        where
            Func: FnOnce($($arg),*) -> Ret + Send + 'static,
        {
            type Output = Ret;

            #[allow(non_snake_case)]
            fn call(self, ($($arg,)*): ($($arg,)*)) -> Ret {
                self($($arg),*)
            }
        }

        impl<Ret: 'static, $($arg: 'static),*> Callable<($($arg,)*)> for Remote<fn($($arg),*) -> Ret> {
            type Output = Ret;

            #[allow(non_snake_case)]
            fn call(self, ($($arg,)*): ($($arg,)*)) -> Ret {
                (self.function)($($arg),*)
            }
        }

        impl<Ret: 'static, $($arg: 'static),*> RemoteFn<($($arg,)*)> for Remote<fn($($arg),*) -> Ret> {
            fn name(&self) -> &'static str {
                self.name
            }
        }
    };
}

impl_callable!();
impl_callable!(A1);
impl_callable!(A1, A2);
impl_callable!(A1, A2, A3);
impl_callable!(A1, A2, A3, A4);
impl_callable!(A1, A2, A3, A4, A5);
impl_callable!(A1, A2, A3, A4, A5, A6);
impl_callable!(A1, A2, A3, A4, A5, A6, A7);
impl_callable!(A1, A2, A3, A4, A5, A6, A7, A8);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn add(a: u32, b: u32) -> u32 {
        a + b
    }

    fn invoke_add(
        args: &mut ArrayReader<'_>,
        out: &mut ArrayWriter,
        limit: usize,
        _describe_err: bool,
    ) -> Result<Returned, Failure> {
        let (a, b): (u32, u32) = decode_args(args, limit, "add")?;
        Ok(Returned {
            value: (&&Encoded(&add(a, b))).encode_output(out, limit, "add"),
            err: None,
        })
    }

    fn invoke_panics(
        _: &mut ArrayReader<'_>,
        out: &mut ArrayWriter,
        limit: usize,
        _: bool,
    ) -> Result<Returned, Failure> {
        // Something is written before the panic: call_element must take it back.
        let _ = out.push(&1u8, limit, String::new);
        panic!("kaboom {}", 7)
    }

    // linkme places the entry with #[link_section]; the entry is plain data.
    #[allow(unsafe_code)]
    #[distributed_slice(REMOTE_FUNCTIONS)]
    static ADD: RemoteFunction = RemoteFunction {
        name: || ADD_HANDLE.name(),
        invoke: invoke_add,
    };

    /// What `#[shoal::remote]` makes of `add`.
    const ADD_HANDLE: Remote<fn(u32, u32) -> u32> =
        Remote::__new(concat!(module_path!(), "::add"), add);

    #[test]
    fn names_agree_between_registry_and_caller() {
        assert_eq!(
            RemoteFn::<(u32, u32)>::name(&ADD_HANDLE),
            "shoal_core::registry::tests::add"
        );
        assert!(lookup(ADD_HANDLE.name()).is_some());
        assert!(registered_names().contains(&"shoal_core::registry::tests::add"));
        assert!(lookup("shoal_core::registry::tests::not_there").is_none());
    }

    #[test]
    fn call_decodes_runs_and_encodes() {
        let args = codec::encode(&(2u32, 3u32), "a", 1024).expect("encode");
        let out = call(&ADD, &args, 1024).expect("call");
        assert_eq!(out.value, Ok(()));
        let bad = codec::encode(&("x",), "a", 1024).expect("encode");
        let failure = call(&ADD, &bad, 1024).expect_err("wrong arguments");
        assert_eq!(failure.kind, TaskErrorKind::Error);
        assert!(
            failure.message.contains("arguments of add"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn chunk_items_are_elements_of_one_array() {
        let mut args = ArrayWriter::payload();
        for pair in [(2u32, 3u32), (10, 20)] {
            args.push(&pair, 1024, String::new).expect("push");
        }
        args.push(&("x",), 1024, String::new).expect("push");
        let payload = args.finish();
        let mut reader = ArrayReader::payload(&payload, 1024, String::new).expect("reader");
        let mut out = ArrayWriter::new();
        call_element(&ADD, &mut reader, &mut out, 1024).expect("first");
        call_element(&ADD, &mut reader, &mut out, 1024).expect("second");
        let failure = call_element(&ADD, &mut reader, &mut out, 1024).expect_err("third");
        assert!(failure.message.contains("arguments of add"), "{failure:?}");
        let results = out.finish();
        let mut read = ArrayReader::array(&results, String::new).expect("results");
        assert_eq!(read.remaining(), 2);
        assert_eq!(read.next::<u32>(String::new).expect("5"), 5);
        assert_eq!(read.next::<u32>(String::new).expect("30"), 30);
    }

    #[test]
    fn panics_become_failures() {
        let f = RemoteFunction {
            name: || "p",
            invoke: invoke_panics,
        };
        let mut chunk = ArrayWriter::payload();
        chunk.push(&(), 1024, String::new).expect("push");
        let chunk = chunk.finish();
        let mut reader = ArrayReader::payload(&chunk, 1024, String::new).expect("reader");
        let mut out = ArrayWriter::new();
        let failure = call_element(&f, &mut reader, &mut out, 1024).expect_err("panics");
        assert_eq!(failure.kind, TaskErrorKind::Panic);
        assert!(
            out.is_empty(),
            "what the item wrote before panicking is taken back"
        );
        let args = codec::encode(&(), "a", 1024).expect("encode");
        let failure = call(&f, &args, 1024).expect_err("panics");
        assert_eq!(failure.kind, TaskErrorKind::Panic);
        assert!(
            failure
                .message
                .starts_with("kaboom 7 at core/src/registry.rs:"),
            "the message names the panic's location: {}",
            failure.message
        );
    }

    struct Opaque;
    #[derive(Debug)]
    struct OnlyDebug;

    #[test]
    // The borrows are what the generated code writes: they select the implementation.
    #[allow(clippy::needless_borrow)]
    fn encoding_and_description_are_chosen_by_type() {
        let mut out = ArrayWriter::new();
        let ok = (&&Encoded(&7u8)).encode_output(&mut out, 64, "f");
        assert!(ok.is_ok());
        let opaque = (&&Encoded(&Opaque))
            .encode_output(&mut out, 64, "f")
            .expect_err("not Serialize");
        assert_eq!(out.len(), 1);
        assert!(
            opaque.message.contains("not Serialize"),
            "{}",
            opaque.message
        );
        assert_eq!((&&Described(&"disp")).describe(), "disp");
        assert_eq!((&&Described(&OnlyDebug)).describe(), "OnlyDebug");
        assert!((&&Described(&Opaque)).describe().contains("Opaque"));
    }

    #[test]
    fn typed_calls() {
        assert_eq!(Callable::call(ADD_HANDLE, (1, 2)), 3);
        assert_eq!(ADD_HANDLE(2, 3), 5);
        assert_eq!(Callable::call(add, (1, 2)), 3);
        assert_eq!(Callable::call(|| 9, ()), 9);
    }
}
