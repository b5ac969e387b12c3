import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Template } from '@huggingface/jinja'
import { Tokenizer } from '@huggingface/tokenizers'
import { z } from 'zod'
import { byteToUnicode } from './tiny-tokenizer.ts'

export interface ChatContentPart {
  type: string
  text?: string
}

export interface ChatMessage {
  role: string
  content: string | ChatContentPart[]
  /** Tool-call history, passed to templates that render it (arguments as objects, as HF expects). */
  tool_calls?: unknown[]
  tool_call_id?: string
  name?: string
}

/** Options for rendering a chat: the generation prompt, and function tools for templates that take them. */
export interface ChatRenderOptions {
  addGenerationPrompt?: boolean
  /** OpenAI-style tools (`{type: 'function', function: {...}}`), the `tools` variable of HF templates. */
  tools?: readonly unknown[]
}

/** Where the two parsed objects came from, so validation errors name the file to fix. */
export interface TokenizerSources {
  tokenizerJson: string
  tokenizerConfig: string
}

// HF writes special tokens in tokenizer_config.json either as strings or as AddedToken objects.
const ConfigToken = z.union([z.string(), z.object({ content: z.string() }).loose()]).nullish()

const TokenizerConfigFile = z
  .object({
    bos_token: ConfigToken,
    eos_token: ConfigToken,
    unk_token: ConfigToken,
    pad_token: ConfigToken,
    add_bos_token: z.boolean().nullish(),
    model_max_length: z.number().nullish(),
    clean_up_tokenization_spaces: z.boolean().nullish(),
    // Older transformers saved several named templates; "default" is the one chat uses.
    chat_template: z
      .union([z.string(), z.array(z.object({ name: z.string(), template: z.string() }))])
      .nullish(),
  })
  .loose()
type TokenizerConfigFile = z.infer<typeof TokenizerConfigFile>

const TokenizerJsonFile = z
  .object({
    model: z.object({ type: z.string().optional() }).loose(),
    added_tokens: z
      .array(
        z
          .object({ id: z.number().int().min(0), content: z.string(), special: z.boolean().optional() })
          .loose(),
      )
      .default([]),
  })
  .loose()

function describeIssues(error: z.ZodError): string {
  return error.issues
    .map((i) => `${i.path.length > 0 ? i.path.join('.') : '(root)'}: ${i.message}`)
    .join('; ')
}

function tokenContent(token: TokenizerConfigFile['bos_token']): string | null {
  if (token == null) return null
  return typeof token === 'string' ? token : token.content
}

/** The text of a message: a string, or its text parts joined by newlines (image and audio parts are dropped). */
export function messageText(content: ChatMessage['content']): string {
  if (typeof content === 'string') return content
  return content
    .filter((part) => part.type === 'text')
    .map((part) => part.text ?? '')
    .join('\n')
}

export interface TokenPiece {
  token: string
  bytes: number[]
}

const utf8 = new TextEncoder()
const lossyUtf8 = new TextDecoder('utf-8', { fatal: false })

/** Whether tokenizer.json decodes with GPT-2's byte-level map (alone or inside a Sequence decoder). */
function isByteLevel(tokenizerJson: unknown): boolean {
  const decoder = (tokenizerJson as { decoder?: { type?: string; decoders?: Array<{ type?: string }> } })
    ?.decoder
  return decoder?.type === 'ByteLevel' || (decoder?.decoders ?? []).some((d) => d?.type === 'ByteLevel')
}

export interface DecodeOptions {
  /** Drop bos, eos and other special tokens from the text (default true, as for generated output). */
  skipSpecialTokens?: boolean
}

/** A model's tokenizer plus its chat template, as transformers' PreTrainedTokenizerFast uses them. */
export class ChatTokenizer {
  readonly bosToken: string | null
  readonly bosTokenId: number | null
  readonly eosToken: string | null
  readonly eosTokenIds: number[]
  readonly addBosToken: boolean
  readonly modelMaxLength: number | null
  readonly specialTokenIds: ReadonlySet<number>
  readonly #tokenizer: Tokenizer
  /** The same tokenizer blind to special tokens: user text is encoded with it. */
  readonly #plain: Tokenizer
  /** Special tokens' texts, longest first (so `<|im_start|>` wins over a prefix of it). */
  readonly #specialTexts: string[]
  readonly #template: Template | null
  readonly #templateSource: string | null
  readonly #cleanUpSpaces: boolean
  /** GPT-2's byte-to-unicode map reversed, when the vocabulary is byte-level; else null. */
  readonly #unicodeToByte: ReadonlyMap<string, number> | null
  readonly #pieces = new Map<number, TokenPiece>()

  /**
   * Builds a tokenizer from the parsed `tokenizer.json` and `tokenizer_config.json` of a model directory.
   * `chatTemplate` overrides the config's template (as a separate `chat_template.jinja` does).
   */
  constructor(
    tokenizerJson: unknown,
    tokenizerConfig: unknown,
    options: { sources?: TokenizerSources; chatTemplate?: string } = {},
  ) {
    const sources = options.sources ?? {
      tokenizerJson: 'tokenizer.json',
      tokenizerConfig: 'tokenizer_config.json',
    }
    const json = TokenizerJsonFile.safeParse(tokenizerJson)
    if (!json.success)
      throw new Error(`${sources.tokenizerJson} is not a valid tokenizer: ${describeIssues(json.error)}`)
    const config = TokenizerConfigFile.safeParse(tokenizerConfig)
    if (!config.success)
      throw new Error(
        `${sources.tokenizerConfig} is not a valid tokenizer config: ${describeIssues(config.error)}`,
      )
    const cfg = config.data

    this.bosToken = tokenContent(cfg.bos_token)
    this.eosToken = tokenContent(cfg.eos_token)
    const unkToken = tokenContent(cfg.unk_token)
    // The library reads special tokens as plain strings, and requires these keys to be present.
    const libraryConfig = {
      ...cfg,
      bos_token: this.bosToken,
      eos_token: this.eosToken,
      unk_token: unkToken,
      pad_token: tokenContent(cfg.pad_token),
      clean_up_tokenization_spaces: cfg.clean_up_tokenization_spaces ?? false,
    }
    const libraryJson = {
      normalizer: null,
      pre_tokenizer: null,
      post_processor: null,
      decoder: null,
      ...json.data,
    }
    try {
      this.#tokenizer = new Tokenizer(libraryJson, libraryConfig)
      // HF's split_special_tokens: text that spells a special token is just text.
      const ordinary = libraryJson.added_tokens.filter((t) => !t.special)
      this.#plain = new Tokenizer({ ...libraryJson, added_tokens: ordinary }, libraryConfig)
    } catch (error) {
      throw new Error(`${sources.tokenizerJson} could not be loaded: ${(error as Error).message}`)
    }

    const idOf = (field: string, token: string | null): number | null => {
      if (token === null) return null
      const id = this.#tokenizer.token_to_id(token)
      if (id === undefined)
        throw new Error(
          `${sources.tokenizerConfig}: ${field} ${JSON.stringify(token)} is not in the vocabulary of ${sources.tokenizerJson}`,
        )
      return id
    }
    this.bosTokenId = idOf('bos_token', this.bosToken)
    const eosId = idOf('eos_token', this.eosToken)
    this.eosTokenIds = eosId === null ? [] : [eosId]
    this.addBosToken = cfg.add_bos_token ?? false
    if (this.addBosToken && this.bosTokenId === null)
      throw new Error(`${sources.tokenizerConfig}: add_bos_token is true but there is no bos_token`)
    // transformers writes a huge sentinel when the model has no limit.
    this.modelMaxLength =
      cfg.model_max_length != null && cfg.model_max_length < 1e12 ? cfg.model_max_length : null
    this.#cleanUpSpaces = cfg.clean_up_tokenization_spaces ?? false
    const specials = json.data.added_tokens.filter((t) => t.special)
    this.specialTokenIds = new Set(specials.map((t) => t.id))
    this.#specialTexts = specials.map((t) => t.content).sort((a, b) => b.length - a.length)

    this.#unicodeToByte = isByteLevel(tokenizerJson)
      ? new Map(byteToUnicode().map((symbol, byte) => [symbol, byte]))
      : null

    const templateSource = options.chatTemplate ?? pickTemplate(cfg.chat_template)
    this.#templateSource = templateSource
    try {
      this.#template = templateSource == null ? null : new Template(templateSource)
    } catch (error) {
      throw new Error(`${sources.tokenizerConfig}: chat_template does not parse: ${(error as Error).message}`)
    }
  }

  /** Reads `tokenizer.json` and `tokenizer_config.json` (and `chat_template.jinja` if present) from a model directory. */
  static async fromFiles(dir: string): Promise<ChatTokenizer> {
    const sources = {
      tokenizerJson: join(dir, 'tokenizer.json'),
      tokenizerConfig: join(dir, 'tokenizer_config.json'),
    }
    // One after the other, so a directory missing both names tokenizer.json, whichever reads faster.
    const tokenizerJson = await readJson(sources.tokenizerJson)
    const tokenizerConfig = await readJson(sources.tokenizerConfig)
    const templateFile = join(dir, 'chat_template.jinja')
    const chatTemplate = existsSync(templateFile) ? await readFile(templateFile, 'utf8') : undefined
    return new ChatTokenizer(tokenizerJson, tokenizerConfig, { sources, chatTemplate })
  }

  get hasChatTemplate(): boolean {
    return this.#template !== null
  }

  /** Whether the chat template renders function tools (reads a `tools` variable), as HF's tool-use templates do. */
  get templateRendersTools(): boolean {
    return this.#templateSource !== null && /\btools\b/.test(this.#templateSource)
  }

  /**
   * Token ids of `text`, with no bos/eos added. Text that spells a special token (`</s>`,
   * `[INST]`, `<|im_start|>`) is encoded as the text it is, never as the control token: users
   * cannot end a sequence or forge a turn by writing one.
   */
  encode(text: string): number[] {
    if (text.length === 0) return []
    return this.#plain.encode(text, { add_special_tokens: false }).ids
  }

  /** Token ids of text whose special-token spellings are control tokens (a chat template's output). */
  #encodeTrusted(text: string, untrusted: ReadonlyMap<string, string>): number[] {
    const ids: number[] = []
    let piece = ''
    const flush = () => {
      // One pass over the piece whatever the number of messages, and no spread of a long id list.
      const plain = piece.replace(SENTINEL, (m) => untrusted.get(m) ?? m)
      for (const id of this.encode(plain)) ids.push(id)
      piece = ''
    }
    for (let i = 0; i < text.length; ) {
      const special = this.#specialTexts.find((t) => text.startsWith(t, i))
      if (special === undefined) {
        piece += text[i++]
        continue
      }
      flush()
      ids.push(this.#tokenizer.token_to_id(special)!)
      i += special.length
    }
    flush()
    return ids
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    // The library throws on an empty list.
    if (ids.length === 0) return ''
    return this.#tokenizer.decode(ids as number[], {
      skip_special_tokens: options.skipSpecialTokens ?? true,
      clean_up_tokenization_spaces: this.#cleanUpSpaces,
    })
  }

  /** The token's string in the vocabulary (e.g. `<s>`, or `Ġ` for a byte-level space). */
  idToToken(id: number): string | undefined {
    return this.#tokenizer.id_to_token(id)
  }

  /**
   * One token's own text and bytes, as logprobs report it: a byte-level token's bytes may be part of
   * a character (its text then holds U+FFFD); a SentencePiece byte token `<0xNN>` is that byte; a
   * special token is empty.
   */
  tokenPiece(id: number): TokenPiece {
    let piece = this.#pieces.get(id)
    if (piece) return piece
    const vocab = this.idToToken(id) ?? ''
    // Special tokens spell no text (decoding skips them), so the pieces of a choice add up to its text.
    let bytes: number[] | null = this.specialTokenIds.has(id) ? [] : null
    if (!bytes && this.#unicodeToByte) {
      const mapped = [...vocab].map((ch) => this.#unicodeToByte!.get(ch))
      if (mapped.every((b) => b !== undefined)) bytes = mapped as number[]
    }
    const byteToken = /^<0x([0-9A-Fa-f]{2})>$/.exec(vocab)
    if (!bytes && byteToken) bytes = [Number.parseInt(byteToken[1]!, 16)]
    bytes ??= [...utf8.encode(this.decode([id], { skipSpecialTokens: false }))]
    piece = { token: lossyUtf8.decode(new Uint8Array(bytes)), bytes }
    this.#pieces.set(id, piece)
    return piece
  }

  tokenToId(token: string): number | undefined {
    return this.#tokenizer.token_to_id(token)
  }

  /** Renders the chat template. Content parts are flattened to text first, which every template accepts. */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatRenderOptions = {}): string {
    if (this.#template === null)
      throw new Error(
        'This model has no chat_template in tokenizer_config.json (nor chat_template.jinja); use a text completion instead',
      )
    try {
      return this.#template.render({
        messages: messages.map((m) => ({ ...m, content: messageText(m.content) })),
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
        add_generation_prompt: options.addGenerationPrompt ?? true,
        ...(options.tools && options.tools.length > 0 ? { tools: options.tools } : {}),
      })
    } catch (error) {
      // raise_exception in a template surfaces here with the template's own message.
      throw new Error(`The chat template rejected the messages: ${(error as Error).message}`)
    }
  }

  /**
   * Prompt ids for a chat. The template is rendered with each message's text stood in for by a
   * random sentinel, so the special tokens the template writes become control tokens while
   * those the users wrote stay text; the text between control tokens is encoded whole, so
   * merges across the template's and the message's text are as the model was trained.
   */
  encodeChat(messages: readonly ChatMessage[], options: ChatRenderOptions = {}): number[] {
    const nonce =
      Math.random()
        .toString(36)
        .slice(2, 12)
        .replace(/[^a-z0-9]/g, '') || 'n'
    const untrusted = new Map<string, string>()
    const stood = messages.map((m, i) => {
      const sentinel = `\u{F0000}${nonce}:${i}\u{F0001}`
      untrusted.set(sentinel, messageText(m.content))
      return { ...m, content: sentinel }
    })
    return this.#encodeTrusted(this.applyChatTemplate(stood, options), untrusted)
  }

  /** Prompt ids for a raw completion; bos is prepended when the model adds one (add_bos_token). */
  encodePrompt(text: string, options: { addBos?: boolean } = {}): number[] {
    const ids = this.encode(text)
    const addBos = options.addBos ?? this.addBosToken
    if (addBos && this.bosTokenId !== null && ids[0] !== this.bosTokenId) ids.unshift(this.bosTokenId)
    return ids
  }

  isEos(id: number): boolean {
    return this.eosTokenIds.includes(id)
  }
}

/** What encodeChat stands in for a message's text (the nonce makes user text unable to forge one). */
const SENTINEL = /\u{F0000}[a-z0-9]+:\d+\u{F0001}/gu

function pickTemplate(value: TokenizerConfigFile['chat_template']): string | null {
  if (value == null) return null
  if (typeof value === 'string') return value
  return (value.find((t) => t.name === 'default') ?? value[0])?.template ?? null
}

async function readJson(path: string): Promise<unknown> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code
    throw new Error(
      code === 'ENOENT'
        ? `${path} is missing; a model directory needs tokenizer.json and tokenizer_config.json`
        : `${path} could not be read: ${(error as Error).message}`,
    )
  }
  try {
    return JSON.parse(text)
  } catch (error) {
    throw new Error(`${path} is not valid JSON: ${(error as Error).message}`)
  }
}
