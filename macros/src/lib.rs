//! `#[shoal::remote]`: makes a free function runnable in another process; `#[derive(shoal::Actor)]`:
//! makes a serde type a durable actor.
//!
//! The attribute keeps the function's body under a hidden name, turns the function's own name into
//! a typed handle (`shoal::Remote`, a constant that derefs to the function: `Process`, `Pool` &
//! co. accept only such handles), and adds an entry to shoal's link-time registry
//! (`shoal::__private::REMOTE_FUNCTIONS`) that decodes the argument tuple (one element of the
//! arguments array of a pool chunk, or a process's single payload), calls the function and
//! appends its encoded result to an output array (`shoal_core::registry::Invoke`). See the
//! `shoal` crate for the rules; in short: a non-generic, non-async free function of 0 to 8
//! arguments whose argument types are owned `serde::Deserialize` types. The return value is
//! encoded when it is `serde::Serialize` (a pool needs it; a process discards it). A return type
//! spelled `Result<T, E>` (any path ending in `Result`) also reports an `Err`, described with
//! `{:#}` (or `{:?}` when `E` is only `Debug`), so that a process returning `Err` exits with
//! code 1.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::parse::Parse;
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type, parse_macro_input};

/// The most arguments a remote function may take (the arity `Process::new` and `Pool` accept).
const MAX_ARGS: usize = 8;

/// Registers a free function so that shoal can run it in another process, and makes its name a
/// typed handle (`shoal::Remote<fn(u64) -> u64>` below) that `Process::new`, the `Pool`'s calls
/// and `Barrier::with_action` accept. The handle derefs to the function: `square(3)` still calls
/// it here, and `*square` is the plain `fn` where one is wanted (`iter.map(*square)`).
///
/// The handle is a constant, so in a scope where it is visible a `let` binding of the same name
/// is refused by the compiler (`let square = ...` "interpreted as a constant"): rename the
/// variable.
///
/// ```ignore
/// #[shoal::remote]
/// fn square(x: u64) -> u64 { x * x }
///
/// let doubled: Vec<u64> = pool.map(square, 0..10u64)?;
/// assert_eq!(square(3), 9);
/// ```
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::TokenStream::from(attr).span(),
            "#[shoal::remote] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let function = parse_macro_input!(item as ItemFn);
    match expand(&function) {
        Ok(tokens) => tokens.into(),
        Err(e) => {
            let error = e.to_compile_error();
            quote!(#function #error).into()
        }
    }
}

fn expand(function: &ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &function.sig;
    let ident = &sig.ident;
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "#[shoal::remote] functions cannot be generic: the worker must know the concrete \
             types (write a wrapper per type)",
        ));
    }
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new(
            asyncness.span(),
            "#[shoal::remote] functions cannot be async",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(syn::Error::new(
            unsafety.span(),
            "#[shoal::remote] functions cannot be unsafe: another process calls them with \
             decoded arguments",
        ));
    }
    if let Some(abi) = &sig.abi {
        return Err(syn::Error::new(
            abi.span(),
            "#[shoal::remote] functions use Rust's ABI (remove the extern)",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(syn::Error::new(
            variadic.span(),
            "variadic functions cannot be remote",
        ));
    }
    if sig.inputs.len() > MAX_ARGS {
        return Err(syn::Error::new(
            sig.inputs.span(),
            format!(
                "#[shoal::remote] functions take at most {MAX_ARGS} arguments; group them in a struct"
            ),
        ));
    }
    let mut arg_types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    "#[shoal::remote] works on free functions, not methods",
                ));
            }
            FnArg::Typed(pat) => {
                check_owned(&pat.ty)?;
                arg_types.push((*pat.ty).clone());
            }
        }
    }
    let bindings: Vec<_> = (0..arg_types.len())
        .map(|i| format_ident!("__shoal_arg{}", i))
        .collect();
    let fallible = match &sig.output {
        ReturnType::Default => false,
        ReturnType::Type(_, ty) => {
            if let Type::ImplTrait(_) = **ty {
                return Err(syn::Error::new(
                    ty.span(),
                    "#[shoal::remote] functions must return a concrete serde type, not impl Trait",
                ));
            }
            is_result(ty)
        }
    };
    // The `Err` is described only when asked (a process); in a pool it is a value.
    let err = if fallible {
        quote! {
            match &__shoal_out {
                ::core::result::Result::Err(error) if __shoal_describe_err => {
                    ::core::option::Option::Some(
                        (&&::shoal::__private::Described(error)).describe(),
                    )
                }
                _ => ::core::option::Option::None,
            }
        }
    } else {
        quote! { ::core::option::Option::None }
    };
    let entry = format_ident!("__SHOAL_REMOTE_{}", ident, span = Span::call_site());
    // The function keeps its body under a hidden name; its own name becomes the typed handle
    // (a constant that derefs to the function), which is what `Process`, `Pool` & co. accept.
    let hidden = format_ident!("__shoal_remote_{}", ident);
    let mut inner = function.clone();
    inner.sig.ident = hidden.clone();
    inner.attrs.retain(|a| !a.path().is_ident("doc"));
    let handle_attrs: Vec<_> = function
        .attrs
        .iter()
        .filter(|a| {
            let path = a.path();
            path.is_ident("doc")
                || path.is_ident("cfg")
                || path.is_ident("cfg_attr")
                || path.is_ident("deprecated")
        })
        .collect();
    let entry_cfgs: Vec<_> = function
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg") || a.path().is_ident("cfg_attr"))
        .collect();
    let vis = &function.vis;
    let output = &sig.output;
    Ok(quote! {
        #[doc(hidden)]
        #inner

        #(#handle_attrs)*
        #[allow(non_upper_case_globals)]
        #vis const #ident: ::shoal::Remote<fn(#(#arg_types),*) #output> = ::shoal::Remote::__new(
            ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
            #hidden,
        );

        // linkme places the entry in a link section; the entry itself is plain data.
        #(#entry_cfgs)*
        #[doc(hidden)]
        #[allow(unsafe_code, non_upper_case_globals)]
        #[::shoal::__private::linkme::distributed_slice(::shoal::__private::REMOTE_FUNCTIONS)]
        #[linkme(crate = ::shoal::__private::linkme)]
        static #entry: ::shoal::__private::RemoteFunction = ::shoal::__private::RemoteFunction {
            name: || #ident.name(),
            // Decodes the next argument tuple of the chunk's array, calls, appends the encoded
            // result to the output array; error texts are built only on failure. (A closure, so
            // that the signature comes from `Invoke`.)
            invoke: |__shoal_args, __shoal_output, __shoal_limit, __shoal_describe_err| {
                #[allow(unused_imports)]
                use ::shoal::__private::{
                    DescribeDebug as _, DescribeDisplay as _, DescribeOpaque as _,
                    EncodeFallback as _, EncodeSerialize as _,
                };
                let __shoal_name = #ident.name();
                let (#(#bindings,)*): (#(#arg_types,)*) =
                    ::shoal::__private::decode_args(__shoal_args, __shoal_limit, __shoal_name)?;
                let __shoal_out = #hidden(#(#bindings),*);
                ::core::result::Result::Ok(::shoal::__private::Returned {
                    err: #err,
                    value: (&&::shoal::__private::Encoded(&__shoal_out))
                        .encode_output(__shoal_output, __shoal_limit, __shoal_name),
                })
            },
        };
    })
}

fn check_owned(ty: &Type) -> syn::Result<()> {
    match ty {
        Type::Reference(r) => Err(syn::Error::new(
            r.span(),
            "#[shoal::remote] arguments must be owned types (String, Vec<T>, ...): they are \
             decoded in another process",
        )),
        Type::ImplTrait(t) => Err(syn::Error::new(
            t.span(),
            "#[shoal::remote] arguments must be concrete types, not impl Trait",
        )),
        Type::Paren(p) => check_owned(&p.elem),
        Type::Group(g) => check_owned(&g.elem),
        Type::Tuple(t) => t.elems.iter().try_for_each(check_owned),
        Type::Array(a) => check_owned(&a.elem),
        _ => Ok(()),
    }
}

fn is_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "Result"),
        Type::Paren(p) => is_result(&p.elem),
        Type::Group(g) => is_result(&g.elem),
        _ => false,
    }
}

/// Makes a serde type a durable actor: `#[derive(shoal::Actor)]` with
/// `#[actor(messages(A, B, ...))]` listing the message types it has a `shoal::Handler` for.
///
/// ```ignore
/// #[derive(Serialize, Deserialize, Default, shoal::Actor)]
/// #[actor(messages(Incr, Get))]
/// struct Counter { n: u64 }
/// ```
#[proc_macro_derive(Actor, attributes(actor))]
pub fn derive_actor(item: TokenStream) -> TokenStream {
    let input = parse_macro_input!(item as syn::DeriveInput);
    match expand_actor(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand_actor(input: &syn::DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new(
            input.generics.span(),
            "#[derive(shoal::Actor)] types cannot be generic: a host process must know the \
             concrete type (write a wrapper per type)",
        ));
    }
    let mut messages: Vec<syn::Type> = Vec::new();
    let mut seen_attribute = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("actor")) {
        seen_attribute = true;
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("messages") {
                let content;
                syn::parenthesized!(content in meta.input);
                let types = content.parse_terminated(syn::Type::parse, syn::Token![,])?;
                messages.extend(types);
                Ok(())
            } else {
                Err(meta.error("expected `messages(Type, ...)`"))
            }
        })?;
    }
    if !seen_attribute || messages.is_empty() {
        return Err(syn::Error::new(
            ident.span(),
            "#[derive(shoal::Actor)] needs #[actor(messages(A, B, ...))]: the message types this \
             actor has a shoal::Handler for",
        ));
    }
    let entry = format_ident!("__SHOAL_ACTOR_{}", ident, span = Span::call_site());
    Ok(quote! {
        impl ::shoal::Actor for #ident {
            fn dispatch(
                &mut self,
                kind: &str,
                payload: &[u8],
                limit: usize,
                context: &mut ::shoal::ActorContext,
            ) -> ::core::result::Result<::std::vec::Vec<u8>, ::shoal::__private::Failure> {
                #(
                    if kind == ::shoal::__private::kind_of::<#messages>() {
                        return ::shoal::__private::handle_encoded::<Self, #messages>(
                            self, payload, limit, context,
                        );
                    }
                )*
                ::core::result::Result::Err(::shoal::__private::unknown_message::<Self>(kind))
            }
        }

        #(impl ::shoal::Handles<#messages> for #ident {})*

        // linkme places the entry in a link section; the entry itself is plain data.
        #[doc(hidden)]
        #[allow(unsafe_code, non_upper_case_globals)]
        #[::shoal::__private::linkme::distributed_slice(::shoal::__private::ACTOR_TYPES)]
        #[linkme(crate = ::shoal::__private::linkme)]
        static #entry: ::shoal::__private::ActorType = ::shoal::__private::ActorType {
            name: || ::std::any::type_name::<#ident>(),
            restore: ::shoal::__private::restore_actor::<#ident>,
        };
    })
}

/// Makes `main` safe for the same-binary model: the generated `main` first checks whether this
/// process is a shoal worker (and then runs its task and exits), before any of your code runs:
/// no side effect, no tokio runtime, no server is ever built in a worker. Put it above any other
/// attribute (`#[tokio::main]`, `#[actix_web::main]`), which then applies to your function.
///
/// ```ignore
/// #[shoal::main]
/// #[tokio::main]
/// async fn main() -> shoal::Result<()> {
///     let _rt = shoal::init()?;
///     // ...
///     Ok(())
/// }
/// ```
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::TokenStream::from(attr).span(),
            "#[shoal::main] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let mut function = parse_macro_input!(item as ItemFn);
    if function.sig.ident != "main" {
        return syn::Error::new(
            function.sig.ident.span(),
            "#[shoal::main] goes on the program's `fn main`",
        )
        .to_compile_error()
        .into();
    }
    let output = function.sig.output.clone();
    let inner = format_ident!("__shoal_main");
    function.sig.ident = inner.clone();
    quote! {
        fn main() #output {
            ::shoal::worker_main();
            #inner()
        }

        #function
    }
    .into()
}
