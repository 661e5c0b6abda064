package posthorn

import (
	"encoding/json"
	"slices"
	"strings"
	"unicode/utf8"
)

// ReservedHeaders are the header names posthorn sets on every record; an event's own headers
// may not use them.
var ReservedHeaders = []string{"event-id", "event-type", "aggregate-type", "outbox-id", "content-type"}

// PayloadKind says what the Kafka record's value is.
type PayloadKind int

const (
	// JSON text, stored in the jsonb payload column; published with content-type
	// application/json, as Postgres renders the jsonb (its key order).
	JSON PayloadKind = iota + 1
	// Bytes, stored in payload_bytes and published exactly as given, with the event's content
	// type as the content-type header.
	Bytes
	// Tombstone: no value (it deletes the key in a compacted topic) and no content-type header.
	Tombstone
)

// Event is one event, ready to be written: every field already satisfies the outbox table's
// rules (only [EventBuilder.Build] makes one), so writing it sends nothing the database would
// refuse. The zero Event is not valid.
type Event struct {
	aggregateType string
	aggregateID   string
	eventType     string
	kind          PayloadKind
	json          string // for JSON
	bytes         []byte // for Bytes: never nil, so that empty bytes are not NULL
	contentType   string // for Bytes
	topic         string // "" is the relay's topic template
	headers       map[string]string
	headersJSON   string // "" when there are no headers: a NULL column
}

// AggregateType is the kind of entity, e.g. "order".
func (e Event) AggregateType() string { return e.aggregateType }

// AggregateID is the entity's id: the Kafka key.
func (e Event) AggregateID() string { return e.aggregateID }

// EventType is e.g. "OrderShipped".
func (e Event) EventType() string { return e.eventType }

// Kind says which payload the event has.
func (e Event) Kind() PayloadKind { return e.kind }

// JSON is the JSON text of a JSON event ("" otherwise).
func (e Event) JSON() string { return e.json }

// Bytes is the value of a bytes event (nil otherwise): the event's own slice, not to be
// modified.
func (e Event) Bytes() []byte { return e.bytes }

// ContentType is the media type of a bytes event ("" otherwise).
func (e Event) ContentType() string { return e.contentType }

// Topic is the topic that overrides the relay's topic template, or "".
func (e Event) Topic() string { return e.topic }

// Headers returns a copy of the event's own headers (posthorn adds its reserved ones on the
// record).
func (e Event) Headers() map[string]string {
	out := make(map[string]string, len(e.headers))
	for name, value := range e.headers {
		out[name] = value
	}
	return out
}

// EventBuilder builds an [Event]; see [NewEvent].
type EventBuilder struct {
	event     Event
	hasTopic  bool
	jsonValue any
	headers   map[string]string
}

// NewEvent starts an event on aggregate aggregateType/aggregateID (the Kafka key). Say what the
// value is with [EventBuilder.JSON], [EventBuilder.Bytes] or [EventBuilder.Tombstone], then
// [EventBuilder.Build].
func NewEvent(aggregateType, aggregateID, eventType string) *EventBuilder {
	return &EventBuilder{event: Event{
		aggregateType: aggregateType,
		aggregateID:   aggregateID,
		eventType:     eventType,
	}}
}

// JSON makes the value v encoded with encoding/json (a json.RawMessage is used as it is, once
// checked). Postgres stores it as jsonb: its rendering, with its key order, is what Kafka
// receives.
func (b *EventBuilder) JSON(v any) *EventBuilder {
	b.event.kind = JSON
	b.jsonValue = v
	return b
}

// Bytes makes the value data, published exactly as given (empty is an empty value, not a
// tombstone), with header content-type: contentType, e.g. "application/x-protobuf".
func (b *EventBuilder) Bytes(data []byte, contentType string) *EventBuilder {
	b.event.kind = Bytes
	b.event.bytes = append([]byte{}, data...)
	b.event.contentType = contentType
	return b
}

// Tombstone makes the record have no value.
func (b *EventBuilder) Tombstone() *EventBuilder {
	b.event.kind = Tombstone
	return b
}

// Topic sends the event to topic instead of the relay's POSTHORN_TOPIC_TEMPLATE.
func (b *EventBuilder) Topic(topic string) *EventBuilder {
	b.event.topic = topic
	b.hasTopic = true
	return b
}

// Header adds a Kafka header; a later value for the same name replaces an earlier one. A
// traceparent set here wins over the one of the span in Enqueue's ctx.
func (b *EventBuilder) Header(name, value string) *EventBuilder {
	if b.headers == nil {
		b.headers = make(map[string]string)
	}
	b.headers[name] = value
	return b
}

// Build checks the event against the outbox table's rules, in the order the Rust writer does,
// and returns the first problem as an *InvalidEventError (which matches ErrInvalidEvent).
func (b *EventBuilder) Build() (Event, error) {
	e := b.event
	switch e.kind {
	case 0:
		return Event{}, invalid("payload", "no payload: call .JSON(..), .Bytes(..) or .Tombstone() before .Build()")
	case JSON:
		text, err := json.Marshal(b.jsonValue)
		if err != nil {
			return Event{}, &InvalidEventError{
				Field:   "payload",
				Message: "the payload cannot be serialized as JSON: " + err.Error(),
				Err:     err,
			}
		}
		e.json = string(text)
	}
	for _, f := range []struct{ name, value string }{
		{"aggregate_type", e.aggregateType},
		{"aggregate_id", e.aggregateID},
		{"event_type", e.eventType},
	} {
		if f.value == "" {
			return Event{}, invalid(f.name, "%s must not be empty", f.name)
		}
		if err := checkStorable(f.name, f.value); err != nil {
			return Event{}, err
		}
	}
	if b.hasTopic && !isTopicName(e.topic) {
		return Event{}, invalid("topic", "topic '%s' is not a Kafka topic name (use 1 to 249 of a-z, A-Z, 0-9, '.', '_' and '-', not '.' or '..')", e.topic)
	}
	names := make([]string, 0, len(b.headers))
	for name := range b.headers {
		names = append(names, name)
	}
	slices.Sort(names) // byte order, as Rust's BTreeMap: the first problem is the same one
	for _, name := range names {
		if slices.Contains(ReservedHeaders, name) {
			return Event{}, invalid("headers", "header name '%s' is reserved: posthorn sets it on every record", name)
		}
		if err := checkStorable("headers", name); err != nil {
			return Event{}, err
		}
		if err := checkStorable("headers", b.headers[name]); err != nil {
			return Event{}, err
		}
	}
	switch e.kind {
	case JSON:
		if hasNULEscape(e.json) {
			return Event{}, invalid("payload", "the JSON payload contains the character U+0000, which Postgres' jsonb cannot store")
		}
	case Bytes:
		if !isMediaType(e.contentType) {
			return Event{}, invalid("content_type", "content_type '%s' is not a media type (for example 'application/x-protobuf' or 'text/plain; charset=utf-8')", e.contentType)
		}
	}
	e.headers = make(map[string]string, len(b.headers))
	for name, value := range b.headers {
		e.headers[name] = value
	}
	if len(e.headers) > 0 {
		text, err := json.Marshal(e.headers)
		if err != nil {
			return Event{}, &InvalidEventError{Field: "headers", Message: err.Error(), Err: err}
		}
		e.headersJSON = string(text)
	}
	return e, nil
}

// checkStorable: Postgres text holds neither U+0000 nor bytes that are not UTF-8 (a Go string
// may hold both; a Rust one only the first).
func checkStorable(field, value string) error {
	if strings.IndexByte(value, 0) >= 0 {
		return invalid(field, "%s contains the character U+0000, which Postgres text cannot store", field)
	}
	if !utf8.ValidString(value) {
		return invalid(field, "%s is not valid UTF-8, which Postgres text requires", field)
	}
	return nil
}

// isTopicName is Kafka's rule for topic names, as the SQL functions and the relay check it.
func isTopicName(topic string) bool {
	if topic == "" || len(topic) > 249 || topic == "." || topic == ".." {
		return false
	}
	for i := 0; i < len(topic); i++ {
		c := topic[i]
		if !isASCIIAlnum(c) && c != '.' && c != '_' && c != '-' {
			return false
		}
	}
	return true
}

// isMediaType: RFC 6838 type and subtype names, then optional ';' parameters in printable
// ASCII; at most 255 bytes. The same rule as the table's content_type CHECK.
func isMediaType(s string) bool {
	if len(s) > 255 {
		return false
	}
	essence, parameters, hasParameters := strings.Cut(s, ";")
	if hasParameters {
		essence = strings.TrimRight(essence, " ")
	}
	typeName, subtypeName, ok := strings.Cut(essence, "/")
	if !ok || !isRestrictedName(typeName) || !isRestrictedName(subtypeName) {
		return false
	}
	for i := 0; i < len(parameters); i++ {
		if parameters[i] < ' ' || parameters[i] > '~' {
			return false
		}
	}
	return true
}

// isRestrictedName is RFC 6838's restricted-name.
func isRestrictedName(name string) bool {
	if name == "" || !isASCIIAlnum(name[0]) {
		return false
	}
	for i := 1; i < len(name); i++ {
		if !isASCIIAlnum(name[i]) && !strings.ContainsRune("!#$&^_.+-", rune(name[i])) {
			return false
		}
	}
	return true
}

func isASCIIAlnum(c byte) bool {
	return ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9')
}

// hasNULEscape reports whether JSON text holds a \u0000 escape (encoding/json writes U+0000
// that way). Outside strings JSON has no backslashes, and inside them every backslash starts an
// escape, so skipping each escape's first two characters finds exactly the real ones.
func hasNULEscape(text string) bool {
	for i := 0; i < len(text); i++ {
		if text[i] == '\\' {
			if strings.HasPrefix(text[i+1:], "u0000") {
				return true
			}
			i++
		}
	}
	return false
}
