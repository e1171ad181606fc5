//! What a `Process` runs, erased: a `#[shoal::remote]` handle with its arguments (runs
//! anywhere; on a thread through its registry entry) or, for `Process::thread`, any closure.

use super::*;

/// A target with its arguments, erased.
pub(super) trait Target: Send {
    /// The registered name, or the type's name for a thread-only target (for display).
    fn function_name(&self) -> &'static str;
    /// Whether the target is a registered function that can run in another process.
    fn runs_elsewhere(&self) -> bool;
    fn encode_args(&self, store: &Store, key: &str) -> Result<Vec<u8>>;
    fn into_thread_body(self: Box<Self>, name: String, limit: usize) -> ThreadBody;
}

/// A `#[shoal::remote]` function: runs anywhere, and on a thread through its registry entry.
pub(super) struct RemoteTarget<F, A> {
    pub(super) target: F,
    pub(super) args: A,
}

impl<F, A> Target for RemoteTarget<F, A>
where
    F: RemoteFn<A>,
    A: Serialize + Send + 'static,
{
    fn function_name(&self) -> &'static str {
        self.target.name()
    }

    fn runs_elsewhere(&self) -> bool {
        true
    }

    fn encode_args(&self, store: &Store, key: &str) -> Result<Vec<u8>> {
        store.encode(&self.args, key)
    }

    fn into_thread_body(self: Box<Self>, name: String, limit: usize) -> ThreadBody {
        let function = self.target.name();
        Box::new(move || match registry::lookup(function) {
            Some(entry) => {
                let outcome = codec::encode(&self.args, &format!("arguments of {function}"), limit)
                    .map_err(registry::Failure::error)
                    .and_then(|args| registry::call(entry, &args, limit))
                    .and_then(registry::Returned::into_process_outcome);
                match outcome {
                    Ok(_) => 0,
                    Err(failure) => {
                        if failure.kind != TaskErrorKind::Panic {
                            let _ = writeln!(
                                std::io::stderr(),
                                "Process {name} ({function}) failed: {}",
                                failure.message
                            );
                        }
                        1
                    }
                }
            }
            None => ThreadTarget {
                target: self.target,
                args: self.args,
            }
            .run(),
        })
    }
}

/// Any function or closure, for [`Process::thread`]: called directly on the thread.
pub(super) struct ThreadTarget<F, A> {
    pub(super) target: F,
    pub(super) args: A,
}

impl<F: Callable<A>, A: Send + 'static> ThreadTarget<F, A> {
    fn run(self) -> i32 {
        let ThreadTarget { target, args } = self;
        match catch_unwind(AssertUnwindSafe(move || target.call(args))) {
            Ok(_) => 0,
            Err(_) => 1,
        }
    }
}

impl<F, A> Target for ThreadTarget<F, A>
where
    F: Callable<A>,
    A: Send + 'static,
{
    fn function_name(&self) -> &'static str {
        std::any::type_name::<F>()
    }

    fn runs_elsewhere(&self) -> bool {
        false
    }

    fn encode_args(&self, _store: &Store, key: &str) -> Result<Vec<u8>> {
        Err(Error::invalid_state(format!(
            "{key}: the arguments of a Process::thread target are never encoded"
        )))
    }

    fn into_thread_body(self: Box<Self>, _name: String, _limit: usize) -> ThreadBody {
        Box::new(move || self.run())
    }
}
