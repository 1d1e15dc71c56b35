//! The query rewrite of transparent reads: each Var that reads a migrated
//! secret column becomes the resolver call of the table's view, in place.
//!
//! Rewritten are the target lists of every query level (SELECT output,
//! UPDATE's SET expressions), function calls in FROM, RETURNING, and the SET
//! expressions of INSERT ... ON CONFLICT DO UPDATE, with subqueries in FROM,
//! in WITH and in those expressions. WHERE, JOIN ... ON, GROUP BY, HAVING
//! and ORDER BY expressions of their own, and ON CONFLICT ... WHERE keep
//! comparing the stored references. Not rewritten either: whole-row Vars,
//! Vars of an outer query level, columns read through a join alias or a
//! view, and MERGE actions.

use std::ffi::{c_void, CStr};

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;

use super::Suspended;
use crate::errors::OrRaise;
use crate::query::{select_by_value, Snapshot};

/// A migrated secret column of a table the query reads.
struct SecretColumn {
    relation: pg_sys::Oid,
    attribute: i16,
    is_kv: bool,
    /// The path column of a key/value table, or the primary key columns of
    /// a wide table, in key order.
    keys: Vec<i16>,
}

/// The resolver functions, as `(statement snapshot, fresh snapshot)` pairs.
struct Resolvers {
    kv: (pg_sys::Oid, pg_sys::Oid),
    column_jsonb: (pg_sys::Oid, pg_sys::Oid),
    column_text: (pg_sys::Oid, pg_sys::Oid),
}

struct Rewriter {
    parse_state: *mut pg_sys::ParseState,
    columns: Vec<SecretColumn>,
    resolvers: Resolvers,
}

/// Context of the mutator callback: the query level whose range table the
/// Vars index, and which resolver twin to call.
struct Scope<'a> {
    rewriter: &'a Rewriter,
    query: *mut pg_sys::Query,
    snapshot: Snapshot,
    /// Whether Vars of the EXCLUDED row are resolved too.
    excluded: bool,
}

/// Rewrites `query` and its subqueries in place when they read a migrated
/// secret column. Queries the declarations only when some query level reads
/// a table.
///
/// # Safety
/// `query` must be a valid analyzed Query and `parse_state` its ParseState.
pub unsafe fn rewrite(parse_state: *mut pg_sys::ParseState, query: *mut pg_sys::Query) {
    let mut relations: Vec<pg_sys::Oid> = Vec::new();
    // SAFETY: the walker gets a pointer to `relations`, which outlives it.
    unsafe {
        collect_relations(
            query as *mut pg_sys::Node,
            &mut relations as *mut Vec<pg_sys::Oid> as *mut c_void,
        );
    }
    if relations.is_empty() {
        return;
    }
    // SAFETY: a catalog lookup by name; missing_ok returns InvalidOid.
    let installed = unsafe { pg_sys::get_extension_oid(c"vault_redirect".as_ptr(), true) };
    if installed == pg_sys::InvalidOid {
        return;
    }
    relations.sort_unstable_by_key(|oid| oid.to_u32());
    relations.dedup();
    let _suspended = Suspended::new();
    let Some(rewriter) = with_snapshot(|| load(parse_state, relations)) else {
        return;
    };
    // SAFETY: the caller passes a valid Query.
    unsafe { rewrite_query(&rewriter, query) };
}

/// Runs `lookup` with an active snapshot, which SPI needs. Parse analysis
/// has one for every statement that reads tables, but a caller may not.
fn with_snapshot<T>(lookup: impl FnOnce() -> T) -> T {
    // SAFETY: the pushed snapshot is popped again before returning; an
    // error aborts the transaction, which pops it.
    unsafe {
        if pg_sys::ActiveSnapshotSet() {
            return lookup();
        }
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let result = lookup();
        pg_sys::PopActiveSnapshot();
        result
    }
}

/// Loads the migrated secret columns of `relations` and the resolvers'
/// OIDs. Returns `None` when there is nothing to rewrite.
fn load(parse_state: *mut pg_sys::ParseState, relations: Vec<pg_sys::Oid>) -> Option<Rewriter> {
    let rows = select_by_value(
        "SELECT c.oid, v.attnum, s.shape = 'kv', k.ord::int4, a.attnum
           FROM vault_redirect.secret_columns s
           JOIN pg_catalog.pg_namespace n ON n.nspname = s.table_schema
           JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = s.table_name
           JOIN pg_catalog.pg_attribute v
             ON v.attrelid = c.oid AND v.attname = s.column_name AND NOT v.attisdropped
           CROSS JOIN LATERAL unnest(CASE s.shape WHEN 'kv' THEN ARRAY[s.path_column]
                                      ELSE s.key_columns END) WITH ORDINALITY AS k(name, ord)
           LEFT JOIN pg_catalog.pg_attribute a
             ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped
          WHERE s.migrated_at IS NOT NULL AND c.oid = ANY($1)
          ORDER BY 1, 2, 4",
        &[DatumWithOid::from(relations)],
        Snapshot::Statement,
        0,
    )
    .or_raise();

    let mut columns: Vec<SecretColumn> = Vec::new();
    let mut incomplete: Vec<(pg_sys::Oid, i16)> = Vec::new();
    for row in rows {
        let relation = pg_sys::Oid::from(row[0]?.value() as u32);
        let attribute = row[1]?.value() as i16;
        let is_kv = row[2]?.value() != 0;
        let Some(key) = row[4] else {
            // A key column that was dropped or renamed: the resolver could
            // not check the row, so the column is left as stored.
            incomplete.push((relation, attribute));
            continue;
        };
        match columns.last_mut() {
            Some(last) if last.relation == relation && last.attribute == attribute => {
                last.keys.push(key.value() as i16)
            }
            _ => columns.push(SecretColumn {
                relation,
                attribute,
                is_kv,
                keys: vec![key.value() as i16],
            }),
        }
    }
    columns.retain(|c| !incomplete.contains(&(c.relation, c.attribute)));
    if columns.is_empty() {
        return None;
    }

    let oids = select_by_value(
        "SELECT to_regprocedure('vault_redirect.resolve_kv(oid,text,text,jsonb)')::oid,
                to_regprocedure('vault_redirect.resolve_kv_written(oid,text,text,jsonb)')::oid,
                to_regprocedure('vault_redirect.resolve_column_jsonb(oid,text,text[],jsonb)')::oid,
                to_regprocedure('vault_redirect.resolve_column_jsonb_written(oid,text,text[],jsonb)')::oid,
                to_regprocedure('vault_redirect.resolve_column_text(oid,text,text[],text)')::oid,
                to_regprocedure('vault_redirect.resolve_column_text_written(oid,text,text[],text)')::oid",
        &[],
        Snapshot::Statement,
        1,
    )
    .or_raise();
    // A missing function (an older extension version) leaves every column
    // as stored.
    let oid = |i: usize| -> Option<pg_sys::Oid> {
        Some(pg_sys::Oid::from(
            oids.first()?.get(i).copied()??.value() as u32
        ))
    };
    Some(Rewriter {
        parse_state,
        columns,
        resolvers: Resolvers {
            kv: (oid(0)?, oid(1)?),
            column_jsonb: (oid(2)?, oid(3)?),
            column_text: (oid(4)?, oid(5)?),
        },
    })
}

/// Adds the OID of every table that any query level reads to the
/// `Vec<Oid>` behind `context`.
#[pg_guard]
unsafe extern "C-unwind" fn collect_relations(
    node: *mut pg_sys::Node,
    context: *mut c_void,
) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `context` is the Vec that rewrite() passes; the nodes come
    // from a valid query tree.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                return pg_sys::query_tree_walker(
                    node as *mut pg_sys::Query,
                    Some(collect_relations),
                    context,
                    pg_sys::QTW_EXAMINE_RTES_BEFORE as i32,
                )
            }
            pg_sys::NodeTag::T_RangeTblEntry => {
                let entry = node as *mut pg_sys::RangeTblEntry;
                if is_table(entry) {
                    (*(context as *mut Vec<pg_sys::Oid>)).push((*entry).relid);
                }
                return false;
            }
            _ => {}
        }
        pg_sys::expression_tree_walker(node, Some(collect_relations), context)
    }
}

/// Tells whether a range table entry reads a table, and is not the
/// EXCLUDED row of ON CONFLICT, which PostgreSQL marks as a composite type.
unsafe fn is_table(entry: *const pg_sys::RangeTblEntry) -> bool {
    // SAFETY: the caller passes a valid entry.
    unsafe {
        (*entry).rtekind == pg_sys::RTEKind::RTE_RELATION
            && (*entry).relkind as u8 != pg_sys::RELKIND_COMPOSITE_TYPE
    }
}

/// Returns the pointers a List of pointers contains.
unsafe fn pointers<T>(list: *mut pg_sys::List) -> Vec<*mut T> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: a non-NIL pointer List has `length` initialised cells.
    unsafe {
        (0..(*list).length as usize)
            .map(|i| (*(*list).elements.add(i)).ptr_value as *mut T)
            .collect()
    }
}

/// Rewrites one query level, then the levels below it.
unsafe fn rewrite_query(rewriter: &Rewriter, query: *mut pg_sys::Query) {
    // SAFETY: `query` is a valid analyzed Query, and every list contains
    // the node types named.
    unsafe {
        for cte in pointers::<pg_sys::CommonTableExpr>((*query).cteList) {
            let inner = (*cte).ctequery;
            if !inner.is_null() && (*inner).type_ == pg_sys::NodeTag::T_Query {
                rewrite_query(rewriter, inner as *mut pg_sys::Query);
            }
        }
        let statement = Scope {
            rewriter,
            query,
            snapshot: Snapshot::Statement,
            excluded: false,
        };
        for entry in pointers::<pg_sys::RangeTblEntry>((*query).rtable) {
            match (*entry).rtekind {
                pg_sys::RTEKind::RTE_SUBQUERY if !(*entry).subquery.is_null() => {
                    rewrite_query(rewriter, (*entry).subquery)
                }
                pg_sys::RTEKind::RTE_FUNCTION => {
                    for function in pointers::<pg_sys::RangeTblFunction>((*entry).functions) {
                        (*function).funcexpr = statement.mutate((*function).funcexpr);
                    }
                }
                _ => {}
            }
        }
        statement.mutate_target_list((*query).targetList);
        // RETURNING of INSERT and UPDATE shows rows this statement wrote,
        // which only a fresh snapshot contains. DELETE's shows rows it
        // deleted, which only the statement's snapshot still contains.
        let returning = Scope {
            snapshot: if (*query).commandType == pg_sys::CmdType::CMD_DELETE {
                Snapshot::Statement
            } else {
                Snapshot::Fresh
            },
            ..statement
        };
        returning.mutate_target_list((*query).returningList);
        // EXCLUDED holds the reference that the write trigger left in the
        // proposed row, and resolves to the plaintext proposed, which only
        // the fresh-snapshot twins return. The existing row resolves as of
        // the statement's snapshot, which ignores the proposal for its path.
        if !(*query).onConflict.is_null() {
            let on_conflict = Scope {
                excluded: true,
                ..statement
            };
            on_conflict.mutate_target_list((*(*query).onConflict).onConflictSet);
        }
    }
}

impl Scope<'_> {
    unsafe fn mutate_target_list(&self, list: *mut pg_sys::List) {
        for entry in unsafe { pointers::<pg_sys::TargetEntry>(list) } {
            // SAFETY: a target list contains TargetEntry nodes.
            unsafe {
                (*entry).expr =
                    self.mutate((*entry).expr as *mut pg_sys::Node) as *mut pg_sys::Expr;
            }
        }
    }

    unsafe fn mutate(&self, node: *mut pg_sys::Node) -> *mut pg_sys::Node {
        // SAFETY: mutate_node reads `self` only during this call.
        unsafe { mutate_node(node, self as *const Scope as *mut c_void) }
    }

    /// Returns the resolver call that replaces `var`, or `None` when it
    /// reads no migrated secret column of this query level.
    unsafe fn replacement(&self, var: *mut pg_sys::Var) -> Option<*mut pg_sys::Node> {
        // SAFETY: `var` is a valid Var of this query level's tree.
        unsafe {
            if (*var).varlevelsup != 0 || (*var).varattno <= 0 {
                return None;
            }
            let entries = pointers::<pg_sys::RangeTblEntry>((*self.query).rtable);
            let entry = *entries.get(((*var).varno as usize).checked_sub(1)?)?;
            let on_conflict = (*self.query).onConflict;
            let is_excluded = self.excluded
                && !on_conflict.is_null()
                && (*on_conflict).exclRelIndex == (*var).varno;
            if !is_table(entry) && !is_excluded {
                return None;
            }
            let scope = Scope {
                rewriter: self.rewriter,
                query: self.query,
                snapshot: if is_excluded {
                    Snapshot::Fresh
                } else {
                    self.snapshot
                },
                excluded: self.excluded,
            };
            let column = self
                .rewriter
                .columns
                .iter()
                .find(|c| c.relation == (*entry).relid && c.attribute == (*var).varattno)?;
            Some(scope.resolver_call(column, var, entry))
        }
    }

    /// Builds the expression the table's view uses for the column, with
    /// `var` as the stored value.
    unsafe fn resolver_call(
        &self,
        column: &SecretColumn,
        var: *mut pg_sys::Var,
        entry: *mut pg_sys::RangeTblEntry,
    ) -> *mut pg_sys::Node {
        let parse_state = self.rewriter.parse_state;
        let fresh = self.snapshot == Snapshot::Fresh;
        let pick = |pair: (pg_sys::Oid, pg_sys::Oid)| if fresh { pair.1 } else { pair.0 };
        // SAFETY: every node is built in the current memory context, which
        // is the one the query tree lives in.
        unsafe {
            let varno = (*var).varno;
            let keys: Vec<*mut pg_sys::Node> = column
                .keys
                .iter()
                .map(|&attribute| {
                    mark_selected(entry, attribute);
                    as_text(parse_state, key_var(column.relation, varno, attribute))
                })
                .collect();
            let stored = pg_sys::copyObjectImpl(var as *const c_void) as *mut pg_sys::Node;
            let mut arguments = vec![
                oid_const(column.relation),
                text_const(&column_name(column.relation, column.attribute)),
            ];
            let (function, result_type) = if column.is_kv {
                arguments.push(keys[0]);
                arguments.push(stored);
                (pick(self.rewriter.resolvers.kv), pg_sys::JSONBOID)
            } else if (*var).vartype == pg_sys::JSONBOID {
                arguments.push(text_array(keys));
                arguments.push(stored);
                (pick(self.rewriter.resolvers.column_jsonb), pg_sys::JSONBOID)
            } else {
                arguments.push(text_array(keys));
                arguments.push(as_text(parse_state, stored));
                (pick(self.rewriter.resolvers.column_text), pg_sys::TEXTOID)
            };
            let mut list: *mut pg_sys::List = std::ptr::null_mut();
            for argument in arguments {
                list = pg_sys::lappend(list, argument as *mut c_void);
            }
            let call = pg_sys::makeFuncExpr(
                function,
                result_type,
                list,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            ) as *mut pg_sys::Node;
            // The cast back to the column's type keeps the query's result
            // type, and a varchar(n) column its length, as the view does.
            let result = pg_sys::coerce_to_target_type(
                parse_state,
                call,
                result_type,
                (*var).vartype,
                (*var).vartypmod,
                pg_sys::CoercionContext::COERCION_EXPLICIT,
                pg_sys::CoercionForm::COERCE_IMPLICIT_CAST,
                -1,
            );
            pg_sys::assign_expr_collations(parse_state, result);
            result
        }
    }
}

/// The expression_tree_mutator callback: replaces Vars of secret columns
/// and rewrites the queries of SubLinks.
#[pg_guard]
unsafe extern "C-unwind" fn mutate_node(
    node: *mut pg_sys::Node,
    context: *mut c_void,
) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: `context` is the Scope that Scope::mutate passes, and `node`
    // is part of a valid expression tree. PostgreSQL 15 declares the
    // callback without parameters, so it is cast to that type.
    unsafe {
        let scope = &*(context as *const Scope);
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => {
                if let Some(call) = scope.replacement(node as *mut pg_sys::Var) {
                    return call;
                }
            }
            pg_sys::NodeTag::T_Query => {
                rewrite_query(scope.rewriter, node as *mut pg_sys::Query);
                return node;
            }
            _ => {}
        }
        let callback: unsafe extern "C-unwind" fn() -> *mut pg_sys::Node = std::mem::transmute(
            mutate_node
                as unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut c_void) -> *mut pg_sys::Node,
        );
        pg_sys::expression_tree_mutator(node, Some(callback), context)
    }
}

/// Adds a column read by the resolver call to the columns whose SELECT
/// privilege the executor checks, as if the query had named it.
unsafe fn mark_selected(entry: *mut pg_sys::RangeTblEntry, attribute: i16) {
    // SAFETY: `entry` is a valid table entry of the query being rewritten.
    unsafe {
        (*entry).requiredPerms |= pg_sys::ACL_SELECT as pg_sys::AclMode;
        (*entry).selectedCols = pg_sys::bms_add_member(
            (*entry).selectedCols,
            attribute as i32 - pg_sys::FirstLowInvalidHeapAttributeNumber,
        );
    }
}

unsafe fn key_var(relation: pg_sys::Oid, varno: i32, attribute: i16) -> *mut pg_sys::Node {
    let mut type_oid = pg_sys::InvalidOid;
    let mut typmod = -1;
    let mut collation = pg_sys::InvalidOid;
    // SAFETY: the attribute exists; load() read it from pg_attribute.
    unsafe {
        pg_sys::get_atttypetypmodcoll(
            relation,
            attribute,
            &mut type_oid,
            &mut typmod,
            &mut collation,
        );
        pg_sys::makeVar(varno, attribute, type_oid, typmod, collation, 0) as *mut pg_sys::Node
    }
}

/// Casts an expression to text as `::text` does, which is how the view
/// and the resolvers spell key values.
unsafe fn as_text(
    parse_state: *mut pg_sys::ParseState,
    node: *mut pg_sys::Node,
) -> *mut pg_sys::Node {
    // SAFETY: `node` is a valid expression; every declared key type has an
    // explicit cast to text.
    unsafe {
        pg_sys::coerce_to_target_type(
            parse_state,
            node,
            pg_sys::exprType(node),
            pg_sys::TEXTOID,
            -1,
            pg_sys::CoercionContext::COERCION_EXPLICIT,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CAST,
            -1,
        )
    }
}

unsafe fn text_array(elements: Vec<*mut pg_sys::Node>) -> *mut pg_sys::Node {
    // SAFETY: palloc0 returns zeroed memory of the node's size, which is a
    // valid ArrayExpr once the tag and types are set.
    unsafe {
        let array =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::ArrayExpr>()) as *mut pg_sys::ArrayExpr;
        (*array).xpr.type_ = pg_sys::NodeTag::T_ArrayExpr;
        (*array).array_typeid = pg_sys::TEXTARRAYOID;
        (*array).element_typeid = pg_sys::TEXTOID;
        for element in elements {
            (*array).elements = pg_sys::lappend((*array).elements, element as *mut c_void);
        }
        (*array).location = -1;
        array as *mut pg_sys::Node
    }
}

unsafe fn oid_const(oid: pg_sys::Oid) -> *mut pg_sys::Node {
    // SAFETY: an oid is a 4-byte by-value datum.
    unsafe {
        pg_sys::makeConst(
            pg_sys::OIDOID,
            -1,
            pg_sys::InvalidOid,
            4,
            oid.into_datum().unwrap_or(pg_sys::Datum::from(0usize)),
            false,
            true,
        ) as *mut pg_sys::Node
    }
}

unsafe fn text_const(value: &str) -> *mut pg_sys::Node {
    // SAFETY: `text` is a palloc'd varlena in the current memory context.
    unsafe {
        let text = pg_sys::cstring_to_text_with_len(value.as_ptr() as *const _, value.len() as i32);
        pg_sys::makeConst(
            pg_sys::TEXTOID,
            -1,
            pg_sys::DEFAULT_COLLATION_OID,
            -1,
            pg_sys::Datum::from(text),
            false,
            false,
        ) as *mut pg_sys::Node
    }
}

fn column_name(relation: pg_sys::Oid, attribute: i16) -> String {
    // SAFETY: get_attname raises when the column does not exist, and
    // returns a palloc'd C string otherwise.
    unsafe {
        let name = pg_sys::get_attname(relation, attribute, false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}
