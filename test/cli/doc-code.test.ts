/**
 * The documentation a newcomer reads first must be true: every ```ts / ```js block in README.md
 * and docs/*.md type-checks against the package entry point (`'vfio-user'` is lib/index.ts, as a
 * user importing the package sees it), and every repository path the documents mention exists
 * (links to headings included).
 */
import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import ts from 'typescript';

const root = path.join(__dirname, '..', '..');
const documents = ['README.md', ...fs.readdirSync(path.join(root, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)];

interface Block {
  doc: string;
  line: number;
  lang: 'ts' | 'js';
  code: string;
}

function codeBlocks(doc: string): Block[] {
  const lines = fs.readFileSync(path.join(root, doc), 'utf8').split('\n');
  const blocks: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\w*)\s*$/.exec(lines[i]!);
    if (open === null) continue;
    const start = i;
    const body: string[] = [];
    for (i++; i < lines.length && !/^```\s*$/.test(lines[i]!); i++) body.push(lines[i]!);
    const lang = open[1]!.toLowerCase();
    if (lang === 'ts' || lang === 'typescript') blocks.push({ doc, line: start + 1, lang: 'ts', code: body.join('\n') });
    else if (lang === 'js' || lang === 'javascript' || lang === 'mjs') blocks.push({ doc, line: start + 1, lang: 'js', code: body.join('\n') });
  }
  return blocks;
}

/** GitHub's anchor for a heading. */
function slug(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\s_-]/gu, '')
    .replace(/\s/g, '-');
}

function anchors(file: string): Set<string> {
  const text = fs.readFileSync(file, 'utf8').replace(/^```[\s\S]*?^```/gm, '');
  return new Set([...text.matchAll(/^#{1,6}\s+(.+)$/gm)].map((m) => slug(m[1]!.replace(/`/g, ''))));
}

describe('README.md and docs/', () => {
  it('every ts/js code block type-checks against the package entry point', () => {
    const blocks = documents.flatMap(codeBlocks);
    expect(blocks.length).toBeGreaterThanOrEqual(8);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-doc-code-'));
    try {
      const files = new Map<string, Block>();
      for (const b of blocks) {
        const file = path.join(dir, `${b.doc.replace(/[/.]/g, '_')}_${String(b.line)}.${b.lang === 'ts' ? 'ts' : 'mjs'}`);
        // Each block is a module of its own (top-level await, no name clashes between blocks).
        fs.writeFileSync(file, `${b.code}\nexport {};\n`);
        files.set(file, b);
      }
      const program = ts.createProgram([...files.keys()], {
        strict: true,
        target: ts.ScriptTarget.ES2022,
        module: ts.ModuleKind.ESNext,
        moduleResolution: ts.ModuleResolutionKind.Bundler,
        lib: ['lib.es2022.d.ts'],
        types: ['node'],
        typeRoots: [path.join(root, 'node_modules', '@types')],
        paths: { 'vfio-user': [path.join(root, 'lib', 'index.ts')] },
        esModuleInterop: true,
        allowJs: true,
        checkJs: true,
        skipLibCheck: true,
        noEmit: true,
      });
      // Diagnostics of the blocks only: lib/ has its own typecheck.
      const problems = [...files.keys()]
        .flatMap((file) => {
          const source = program.getSourceFile(file)!;
          return [...program.getSyntacticDiagnostics(source), ...program.getSemanticDiagnostics(source)];
        })
        .map((d) => {
          const b = files.get(path.normalize(d.file!.fileName))!;
          const { line } = d.file!.getLineAndCharacterOfPosition(d.start ?? 0);
          return `${b.doc}:${String(b.line + 1 + line)}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
        });
      expect(problems).toEqual([]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);

  it('every repository path they mention exists, and every link reaches a file and heading', () => {
    const missing: string[] = [];
    const top = 'lib|test|docs|examples|bench|scripts|native|prebuilds|dist|\\.ci';
    for (const doc of documents) {
      const text = fs.readFileSync(path.join(root, doc), 'utf8');
      // Paths from the repository root, as prose and commands name them.
      for (const m of text.matchAll(new RegExp(`(?<=^|[\\s\`'"(\\[])((?:${top})/[\\w./-]*)`, 'gm'))) {
        const p = m[1]!.replace(/[.:]+$/, '');
        if (p === 'prebuilds/linux-x64' || p.startsWith('prebuilds/') || p.startsWith('dist/')) continue; // made by a build
        if (!fs.existsSync(path.join(root, p))) missing.push(`${doc}: ${p}`);
      }
      // Markdown links, relative to the document.
      for (const m of text.matchAll(/\]\(([^)\s]+)\)/g)) {
        const target = m[1]!;
        if (/^[a-z]+:/i.test(target)) continue; // https:, mailto:
        const [file, anchor] = target.split('#') as [string, string | undefined];
        const resolved = file === '' ? path.join(root, doc) : path.join(root, path.dirname(doc), file);
        if (!fs.existsSync(resolved)) missing.push(`${doc}: link ${target}`);
        else if (anchor !== undefined && resolved.endsWith('.md') && !anchors(resolved).has(anchor)) missing.push(`${doc}: link ${target} (no such heading)`);
      }
    }
    expect(missing).toEqual([]);
  });
});
