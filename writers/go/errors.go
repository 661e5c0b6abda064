package posthorn

import (
	"errors"
	"fmt"
)

// Sentinel errors, for errors.Is. The errors returned wrap one of them with the details.
var (
	// ErrInvalidEvent: the event breaks one of the outbox table's rules; nothing was sent to
	// Postgres. The error is an *InvalidEventError naming the field.
	ErrInvalidEvent = errors.New("invalid event")
	// ErrInvalidName: an outbox schema or table name that is not a lowercase SQL identifier.
	ErrInvalidName = errors.New("invalid outbox name")
	// ErrUnsupportedTx: Enqueue was given something that is neither pgx's nor database/sql's.
	ErrUnsupportedTx = errors.New("unsupported transaction type")
	// ErrDatabase: Postgres refused or failed the statement; the caller's transaction is then
	// aborted, as after any failed statement: roll it back (or to a savepoint). The error is a
	// *DatabaseError.
	ErrDatabase = errors.New("writing events failed")
	// ErrNotMigrated: the outbox table or its migration-5 columns are missing: run posthorn
	// migrate. Returned wrapped in a *DatabaseError, which also matches ErrDatabase.
	ErrNotMigrated = errors.New("the table needs posthorn's migration 5 or later: run `posthorn migrate`")
)

// InvalidEventError says which rule an event breaks. It matches ErrInvalidEvent.
type InvalidEventError struct {
	// Field is the offending part: aggregate_type, aggregate_id, event_type, payload,
	// content_type, topic or headers.
	Field string
	// Message is the same sentence the Rust writer reports.
	Message string
	// Err is the cause, when there is one (a JSON encoding error).
	Err error
}

func (e *InvalidEventError) Error() string { return "invalid event: " + e.Message }

// Is reports whether target is ErrInvalidEvent.
func (e *InvalidEventError) Is(target error) bool { return target == ErrInvalidEvent }

func (e *InvalidEventError) Unwrap() error { return e.Err }

func invalid(field, format string, args ...any) *InvalidEventError {
	return &InvalidEventError{Field: field, Message: fmt.Sprintf(format, args...)}
}

// DatabaseError is a statement Postgres refused or failed. It matches ErrDatabase, and
// ErrNotMigrated when the table or a column is missing; Unwrap gives the driver's error (a
// *pgconn.PgError with pgx).
type DatabaseError struct {
	// Table is schema.table.
	Table string
	Err   error
}

func (e *DatabaseError) Error() string {
	msg := fmt.Sprintf("writing events to %s: %v", e.Table, e.Err)
	if e.notMigrated() {
		msg += " (" + ErrNotMigrated.Error() + ")"
	}
	return msg
}

// Is reports whether target is ErrDatabase, or ErrNotMigrated for a missing table or column.
func (e *DatabaseError) Is(target error) bool {
	return target == ErrDatabase || (target == ErrNotMigrated && e.notMigrated())
}

func (e *DatabaseError) Unwrap() error { return e.Err }

// notMigrated: undefined_table or undefined_column. Drivers that report an SQLSTATE (pgx, lib/pq)
// have a SQLState method.
func (e *DatabaseError) notMigrated() bool {
	var coded interface{ SQLState() string }
	if !errors.As(e.Err, &coded) {
		return false
	}
	code := coded.SQLState()
	return code == "42P01" || code == "42703"
}
