import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ProtocolError, parseJson, stringifyJson, type JsonValue } from '../../lib/protocol';

describe('strict JSON', () => {
  it('parses integers as exact bigints and other numbers as numbers', () => {
    expect(parseJson('{"a":8,"b":8.0,"c":1e3,"d":-0,"e":18446744073709551615}')).toEqual({
      a: 8n, b: 8, c: 1000, d: 0n, e: 18446744073709551615n,
    });
  });

  it('parses the usual values and whitespace', () => {
    expect(parseJson(' { "s" : "a\\"b\\\\c\\n\\u00e9\\/" , "t":true,"f":false,"n":null,"a":[1, [] ,{}] } ')).toEqual({
      s: 'a"b\\c\né/', t: true, f: false, n: null, a: [1n, [], {}],
    });
  });

  it('keeps __proto__ as an ordinary key', () => {
    const v = parseJson('{"__proto__":{"polluted":1}}') as Record<string, unknown>;
    expect(Object.getPrototypeOf(v)).toBe(Object.prototype);
    expect(Object.keys(v)).toEqual(['__proto__']);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it.each([
    '', '{', '}', '{"a":}', '{"a":1,}', '[1,]', '{a:1}', "{'a':1}", '01', '1.', '.5', '+1', 'tru',
    '{"a":1}x', '"\u0001"', '"\\x"', '"\\u12g4"', '"abc', 'NaN', '1e999', '{"a" 1}', '[1 2]',
  ])('rejects %j with a ProtocolError', (text) => {
    expect(() => parseJson(text)).toThrow(ProtocolError);
  });

  it('limits nesting depth and integer length', () => {
    expect(() => parseJson('['.repeat(33) + ']'.repeat(33))).not.toThrow();
    expect(() => parseJson('['.repeat(40) + ']'.repeat(40))).toThrow(/nesting/);
    expect(() => parseJson('['.repeat(100000))).toThrow(ProtocolError);
    expect(() => parseJson('1'.repeat(41))).toThrow(/too long/);
  });

  it('stringifies compactly, bigints as integer literals', () => {
    expect(stringifyJson({ a: 1n, b: [true, null, 'x"'], c: { d: 2.5 } })).toBe('{"a":1,"b":[true,null,"x\\""],"c":{"d":2.5}}');
    expect(() => stringifyJson(Infinity)).toThrow(RangeError);
  });

  it('round-trips any JSON value (parse . stringify = id)', () => {
    const leaf: fc.Arbitrary<JsonValue> = fc.oneof(
      fc.constant(null),
      fc.boolean(),
      fc.string(),
      fc.bigInt({ min: -(2n ** 70n), max: 2n ** 70n }),
      fc.double({ noNaN: true, noDefaultInfinity: true }).filter((d) => !Number.isInteger(d)),
    );
    const value = fc.letrec<{ v: JsonValue }>((tie) => ({
      v: fc.oneof({ depthSize: 'small' }, leaf, fc.array(tie('v'), { maxLength: 4 }), fc.dictionary(fc.string(), tie('v'), { maxKeys: 4 })),
    })).v;
    fc.assert(
      fc.property(value, (v) => {
        expect(parseJson(stringifyJson(v))).toEqual(v);
      }),
    );
  });

  it('agrees with JSON.parse on structure for any JSON text JSON.parse accepts', () => {
    fc.assert(
      fc.property(fc.json(), (text) => {
        const ours = parseJson(text);
        const normalised = JSON.parse(stringifyJson(ours), (_k, v: unknown) => v);
        expect(normalised).toEqual(JSON.parse(text));
      }),
    );
  });

  it('never throws anything but ProtocolError on arbitrary text', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 64 }), (text) => {
        try {
          parseJson(text);
        } catch (e) {
          expect(e).toBeInstanceOf(ProtocolError);
        }
      }),
    );
  });
});
