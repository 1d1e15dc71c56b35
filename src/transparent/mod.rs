//! Transparent reads. With `vault_redirect.transparent_reads` on, a
//! post_parse_analyze hook rewrites each query so that its output columns
//! that read a migrated secret column call the resolver the table's view
//! calls. The application keeps querying the table itself, which INSERT ...
//! ON CONFLICT needs, because it cannot target a view.
//!
//! The hook runs only in sessions that loaded the library before their
//! statements were parsed (session_preload_libraries or
//! shared_preload_libraries). Without it the statements return the stored
//! references, never a wrong value.

mod rewrite;

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::gucs::TRANSPARENT_READS;

thread_local! {
    /// How many [`Suspended`] guards are alive in this backend.
    static SUSPENDED: Cell<u32> = const { Cell::new(0) };
}

/// Turns the rewrite off while it lives. The extension's own SPI queries
/// and the resolvers take one, so that they read the stored references, and
/// so that the hook's lookup of the declarations does not run the hook
/// again.
pub struct Suspended(());

impl Suspended {
    pub fn new() -> Self {
        SUSPENDED.with(|depth| depth.set(depth.get() + 1));
        Suspended(())
    }
}

impl Default for Suspended {
    fn default() -> Self {
        Suspended::new()
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        SUSPENDED.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

fn is_suspended() -> bool {
    SUSPENDED.with(|depth| depth.get() > 0)
}

static mut PREVIOUS_POST_PARSE_ANALYZE: pg_sys::post_parse_analyze_hook_type = None;
static mut PREVIOUS_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hooks, chained in front of any that other libraries
/// installed before. Called once per backend, from `_PG_init`.
pub fn install() {
    // SAFETY: _PG_init runs once per backend, before any statement could
    // call the hooks, and the backend has a single thread.
    unsafe {
        PREVIOUS_POST_PARSE_ANALYZE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse_analyze);
        PREVIOUS_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        pg_sys::RegisterXactCallback(Some(reset_at_abort), std::ptr::null_mut());
    }
    if TRANSPARENT_READS.get() && !listed_in_preload_libraries() {
        warning!(
            "vault_redirect.transparent_reads is on, but vault_redirect was loaded only now: \
             statements parsed before returned references"
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn post_parse_analyze(
    parse_state: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jumble_state: *mut pg_sys::JumbleState,
) {
    // SAFETY: the previous hook, if any, was installed by another library
    // and takes the arguments PostgreSQL passed to this one.
    let previous = unsafe { PREVIOUS_POST_PARSE_ANALYZE };
    if let Some(previous) = previous {
        unsafe { previous(parse_state, query, jumble_state) };
    }
    if !TRANSPARENT_READS.get() || is_suspended() || query.is_null() {
        return;
    }
    // SAFETY: PostgreSQL passes a valid, just analyzed Query. The rewrite
    // changes only expressions of it and of its subqueries, in place.
    unsafe {
        if !pg_sys::IsTransactionState() || pg_sys::creating_extension {
            return;
        }
        // Inside a SECURITY DEFINER function the resolvers would run as the
        // function's owner, so the caller's setting would turn what the
        // function returns into plaintext that the caller may not read.
        if pg_sys::InLocalUserIdChange() || pg_sys::InSecurityRestrictedOperation() {
            return;
        }
        let Some(statement) = readable_query(query) else {
            return;
        };
        rewrite::rewrite(parse_state, statement);
    }
}

/// Returns the query whose rows a statement returns: the statement itself,
/// or the query inside DECLARE ... CURSOR FOR and EXPLAIN. Other utility
/// statements, CREATE TABLE AS among them, are left alone.
unsafe fn readable_query(query: *mut pg_sys::Query) -> Option<*mut pg_sys::Query> {
    // SAFETY: the caller passes a valid Query; utilityStmt is a Node.
    unsafe {
        if (*query).commandType != pg_sys::CmdType::CMD_UTILITY {
            return Some(query);
        }
        let utility = (*query).utilityStmt;
        if utility.is_null() {
            return None;
        }
        let inner = match (*utility).type_ {
            pg_sys::NodeTag::T_DeclareCursorStmt => {
                (*(utility as *mut pg_sys::DeclareCursorStmt)).query
            }
            pg_sys::NodeTag::T_ExplainStmt => (*(utility as *mut pg_sys::ExplainStmt)).query,
            _ => return None,
        };
        let is_plain_query = !inner.is_null()
            && (*inner).type_ == pg_sys::NodeTag::T_Query
            && (*(inner as *mut pg_sys::Query)).commandType != pg_sys::CmdType::CMD_UTILITY;
        is_plain_query.then_some(inner as *mut pg_sys::Query)
    }
}

/// Suspends the rewrite while CREATE VIEW runs, so that a view defined by a
/// role with the setting on stores the plain column, as for anyone else.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_environment: *mut pg_sys::QueryEnvironment,
    destination: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL passes a valid PlannedStmt; the arguments go on
    // unchanged to the previous hook or the standard implementation.
    unsafe {
        let utility = (*statement).utilityStmt;
        let defines_view = !utility.is_null() && (*utility).type_ == pg_sys::NodeTag::T_ViewStmt;
        let _suspended = defines_view.then(Suspended::new);
        match PREVIOUS_PROCESS_UTILITY {
            Some(previous) => previous(
                statement,
                query_string,
                read_only_tree,
                context,
                params,
                query_environment,
                destination,
                completion,
            ),
            None => pg_sys::standard_ProcessUtility(
                statement,
                query_string,
                read_only_tree,
                context,
                params,
                query_environment,
                destination,
                completion,
            ),
        }
    }
}

/// Clears the suspension count when a transaction aborts. Every guard is
/// dropped while an error unwinds, so this matters only if an error ever
/// skipped a Rust frame. A leaked count would leave the rewrite off for the
/// rest of the session, which returns references.
#[pg_guard]
unsafe extern "C-unwind" fn reset_at_abort(event: pg_sys::XactEvent::Type, _argument: *mut c_void) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT {
        SUSPENDED.with(|depth| depth.set(0));
    }
}

/// Tells whether a preload setting names this library, so that every
/// statement of the session is parsed with the hook installed.
fn listed_in_preload_libraries() -> bool {
    [
        c"shared_preload_libraries",
        c"session_preload_libraries",
        c"local_preload_libraries",
    ]
    .iter()
    .any(|setting| {
        // SAFETY: GetConfigOption returns NULL or a string owned by the GUC
        // machinery, which is copied before any other GUC call.
        let value = unsafe { pg_sys::GetConfigOption(setting.as_ptr(), true, false) };
        if value.is_null() {
            return false;
        }
        let value = unsafe { CStr::from_ptr(value) }.to_string_lossy();
        value.split(',').any(|library| {
            let library = library.trim().trim_matches('"');
            library == "vault_redirect" || library.ends_with("/vault_redirect")
        })
    })
}
