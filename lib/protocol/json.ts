/**
 * Strict JSON for the `VERSION` capabilities (reference 3.1).
 *
 * Why not `JSON.parse`: the real peers type-check capability values ("must be a JSON integer":
 * libvfio-user rejects `8.0`, QEMU rejects non-integers), and 64-bit values such as `pgsizes` must
 * never be rounded (reference 1.3). `JSON.parse` loses both distinctions. This parser keeps them:
 *
 * - an integer literal (no fraction, no exponent) becomes a `bigint`, exactly;
 * - any other number literal becomes a `number` (non-finite values are rejected);
 * - strings, booleans, null, arrays and objects as usual (duplicate keys: the last one wins;
 *   `__proto__` is an ordinary key).
 *
 * Input is RFC 8259 JSON; errors throw {@link ProtocolError}. Nesting depth is limited, as is the
 * length of an integer literal, so hostile input cannot exhaust the stack or the CPU.
 *
 * @packageDocumentation
 */
import { ProtocolError } from './errors';

/** A parsed JSON value (integers are `bigint`, see the module comment). */
export type JsonValue = null | boolean | number | bigint | string | JsonValue[] | JsonObject;
/** A parsed JSON object. */
export interface JsonObject {
  [key: string]: JsonValue;
}

/** Deepest nesting accepted. */
export const JSON_MAX_DEPTH = 32;
/** Longest integer literal accepted (a u64 has 20 digits). */
const MAX_INT_LITERAL = 40;

const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;

class Parser {
  private i = 0;

  constructor(private readonly s: string, private readonly what: string) {}

  fail(problem: string): never {
    throw new ProtocolError(`${this.what}: invalid JSON at character ${String(this.i)}: ${problem}`, { field: 'data' });
  }

  ws(): void {
    const s = this.s;
    let i = this.i;
    for (;;) {
      const c = s.charCodeAt(i);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) i++;
      else break;
    }
    this.i = i;
  }

  document(): JsonValue {
    this.ws();
    const v = this.value(0);
    this.ws();
    if (this.i !== this.s.length) this.fail('unexpected trailing characters');
    return v;
  }

  value(depth: number): JsonValue {
    if (depth > JSON_MAX_DEPTH) this.fail(`nesting deeper than ${String(JSON_MAX_DEPTH)}`);
    const c = this.s.charCodeAt(this.i);
    switch (c) {
      case 0x7b: // {
        return this.object(depth);
      case 0x5b: // [
        return this.array(depth);
      case 0x22: // "
        return this.string();
      case 0x74: // t
        return this.literal('true', true);
      case 0x66: // f
        return this.literal('false', false);
      case 0x6e: // n
        return this.literal('null', null);
      default:
        if (c === 0x2d || (c >= 0x30 && c <= 0x39)) return this.number();
        return this.fail(Number.isNaN(c) ? 'unexpected end of text' : 'unexpected character');
    }
  }

  literal<T extends JsonValue>(word: string, value: T): T {
    if (!this.s.startsWith(word, this.i)) this.fail(`expected ${word}`);
    this.i += word.length;
    return value;
  }

  number(): number | bigint {
    NUMBER.lastIndex = this.i;
    const m = NUMBER.exec(this.s);
    if (m === null) return this.fail('malformed number');
    const text = m[0];
    if (m[1] === undefined && m[2] === undefined) {
      if (text.length > MAX_INT_LITERAL) this.fail('integer literal too long');
      this.i += text.length;
      return BigInt(text);
    }
    const n = Number(text);
    if (!Number.isFinite(n)) this.fail('number out of range');
    this.i += text.length;
    return n;
  }

  string(): string {
    const s = this.s;
    let i = this.i + 1;
    let out = '';
    let start = i;
    for (;;) {
      if (i >= s.length) {
        this.i = i;
        this.fail('unterminated string');
      }
      const c = s.charCodeAt(i);
      if (c === 0x22) break;
      if (c < 0x20) {
        this.i = i;
        this.fail('control character in string');
      }
      if (c !== 0x5c) {
        i++;
        continue;
      }
      out += s.slice(start, i);
      const e = s.charCodeAt(i + 1);
      i += 2;
      switch (e) {
        case 0x22: out += '"'; break;
        case 0x5c: out += '\\'; break;
        case 0x2f: out += '/'; break;
        case 0x62: out += '\b'; break;
        case 0x66: out += '\f'; break;
        case 0x6e: out += '\n'; break;
        case 0x72: out += '\r'; break;
        case 0x74: out += '\t'; break;
        case 0x75: {
          const hex = s.slice(i, i + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) {
            this.i = i;
            this.fail('bad \\u escape');
          }
          out += String.fromCharCode(parseInt(hex, 16));
          i += 4;
          break;
        }
        default:
          this.i = i - 1;
          this.fail('bad escape');
      }
      start = i;
    }
    out += s.slice(start, i);
    this.i = i + 1;
    return out;
  }

  array(depth: number): JsonValue[] {
    this.i++;
    const out: JsonValue[] = [];
    this.ws();
    if (this.s.charCodeAt(this.i) === 0x5d) {
      this.i++;
      return out;
    }
    for (;;) {
      this.ws();
      out.push(this.value(depth + 1));
      this.ws();
      const c = this.s.charCodeAt(this.i++);
      if (c === 0x5d) return out;
      if (c !== 0x2c) {
        this.i--;
        this.fail("expected ',' or ']'");
      }
    }
  }

  object(depth: number): JsonObject {
    this.i++;
    const out: JsonObject = {};
    this.ws();
    if (this.s.charCodeAt(this.i) === 0x7d) {
      this.i++;
      return out;
    }
    for (;;) {
      this.ws();
      if (this.s.charCodeAt(this.i) !== 0x22) this.fail('expected a string key');
      const key = this.string();
      this.ws();
      if (this.s.charCodeAt(this.i) !== 0x3a) this.fail("expected ':'");
      this.i++;
      this.ws();
      const v = this.value(depth + 1);
      // defineProperty: a "__proto__" key must stay an own data property, never set the prototype.
      Object.defineProperty(out, key, { value: v, enumerable: true, writable: true, configurable: true });
      this.ws();
      const c = this.s.charCodeAt(this.i++);
      if (c === 0x7d) return out;
      if (c !== 0x2c) {
        this.i--;
        this.fail("expected ',' or '}'");
      }
    }
  }
}

/**
 * Parses JSON text strictly (see the module comment for the number representation).
 *
 * @param what message name for errors
 * @throws {ProtocolError} (`EINVAL`) on any syntax error, excessive nesting or overlong integer.
 */
export function parseJson(text: string, what = 'JSON'): JsonValue {
  return new Parser(text, what).document();
}

/** True for a JSON object (not an array, not null). */
export function isJsonObject(v: JsonValue | undefined): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Serialises a {@link JsonValue} compactly (no spaces, insertion order), writing `bigint`s as
 * integer literals. Object members whose value is `undefined` are skipped.
 *
 * @throws {RangeError} for non-finite numbers; {@link TypeError} for values JSON cannot hold.
 */
export function stringifyJson(value: JsonValue): string {
  switch (typeof value) {
    case 'bigint':
      return value.toString();
    case 'number':
      if (!Number.isFinite(value)) throw new RangeError(`Expected a finite number, got ${String(value)}`);
      return JSON.stringify(value);
    case 'string':
    case 'boolean':
      return JSON.stringify(value);
    case 'object': {
      if (value === null) return 'null';
      if (Array.isArray(value)) return `[${value.map(stringifyJson).join(',')}]`;
      const parts: string[] = [];
      for (const key of Object.keys(value)) {
        const v = value[key] as JsonValue | undefined;
        if (v !== undefined) parts.push(`${JSON.stringify(key)}:${stringifyJson(v)}`);
      }
      return `{${parts.join(',')}}`;
    }
    default:
      throw new TypeError(`Expected a JSON value, got ${typeof value}`);
  }
}
