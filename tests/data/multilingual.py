"""A multilingual sample: a few paragraphs of ordinary prose per language, and source code.

Written for this project (no external corpus is reachable here). Used by the tokenizer tests
(agreement with mistral-common) and by benchmarks/tokenizer_stats.py (characters and bytes
per token, Tekken vs Mistral 7B's SentencePiece tokenizer).
"""

# language -> (script, text)
PROSE: dict[str, tuple[str, str]] = {
    "english": (
        "Latin",
        """\
The river had been rising for three days when the villagers finally decided to move the animals to higher ground. Nobody remembered a spring like it: the snow in the mountains had melted all at once, and every stream that fed the valley was running brown and fast.

Maria walked along the old stone wall with her grandfather, who stopped every few steps to point at something he remembered from his childhood. "That field used to flood every year," he said, "but we never lost a single house. People built with the river in mind back then."

By evening the rain had stopped. The sky cleared over the western hills, and for the first time in a week the children could see the stars. Someone lit a fire in the square, and the whole village gathered around it, tired but relieved.""",
    ),
    "french": (
        "Latin",
        """\
Le matin du départ, la gare était presque vide. Quelques voyageurs attendaient sur le quai, une tasse de café à la main, en regardant le tableau des horaires qui clignotait sans cesse. Le train pour Marseille avait déjà vingt minutes de retard.

Claire avait préparé sa valise la veille, mais elle avait oublié son parapluie chez sa sœur. « Tant pis », se dit-elle, « il fera sûrement beau dans le Sud. » Elle sortit son carnet et relut la liste des choses à faire avant la fin de la semaine.

Quand le train arriva enfin, elle trouva une place près de la fenêtre. Les champs de blé défilaient sous un ciel gris, puis les collines, puis les premiers oliviers. À Lyon, un vieil homme s'assit en face d'elle et commença à lui raconter l'histoire de sa famille.""",
    ),
    "german": (
        "Latin",
        """\
Die Bibliothek der kleinen Stadt war im ehemaligen Rathaus untergebracht, einem schmalen Gebäude mit hohen Fenstern und knarrenden Holzböden. Frau Schneider arbeitete dort seit über dreißig Jahren und kannte fast jedes Buch im Regal.

An einem regnerischen Donnerstag kam ein Junge herein, der nach einem Buch über Vulkane fragte. Sie führte ihn zur Abteilung für Naturwissenschaften und zeigte ihm einen Atlas, den seit Jahren niemand mehr ausgeliehen hatte. „Hier findest du alles über den Ätna und den Vesuv“, sagte sie.

Der Junge blieb bis zur Schließung und las, ohne aufzublicken. Als er ging, fragte er, ob er morgen wiederkommen dürfe. Frau Schneider lächelte und sagte, die Tür stehe jedem offen, der neugierig sei.""",
    ),
    "spanish": (
        "Latin",
        """\
En el pueblo de mis abuelos, las fiestas de agosto duraban una semana entera. Las calles se llenaban de música desde temprano, y los vecinos sacaban mesas largas a la plaza para compartir la comida que cada familia había preparado.

Mi abuela siempre cocinaba una paella enorme en una sartén de hierro que había heredado de su madre. Decía que el secreto no estaba en el arroz ni en el azafrán, sino en la paciencia: «Si tienes prisa, mejor no cocines».

Por la noche, cuando el calor por fin bajaba, los niños corríamos entre las mesas mientras los mayores bailaban. Años después, todavía recuerdo el olor del humo, las luces de colores y la voz de mi abuelo cantando canciones antiguas.""",
    ),
    "italian": (
        "Latin",
        """\
Il laboratorio di mio zio si trovava in fondo a un vicolo stretto, vicino al porto. Era un falegname e passava le giornate a restaurare mobili antichi che i clienti gli portavano da tutta la regione.

Ricordo l'odore del legno appena tagliato e il rumore della pialla che scorreva lenta sulle tavole. Mi lasciava aiutarlo a levigare i cassetti, e ogni tanto mi spiegava la differenza tra il noce, il ciliegio e la quercia.

Quando chiuse la bottega, molti anni dopo, mi regalò una piccola scatola intarsiata che aveva costruito da giovane. La tengo ancora sulla scrivania, e dentro conservo le lettere che ci scrivevamo quando vivevo all'estero.""",
    ),
    "portuguese": (
        "Latin",
        """\
A praia estava quase deserta naquela manhã de outono. Apenas alguns pescadores arrumavam as redes perto do cais, enquanto as gaivotas voavam baixo sobre as ondas, à procura de restos de peixe.

João sentou-se na areia e abriu a carta que tinha recebido na véspera. Era da irmã, que vivia em São Paulo havia mais de dez anos. Ela escrevia que finalmente ia visitá-lo no Natal, com o marido e os dois filhos.

Ele leu a carta duas vezes e depois ficou a olhar o mar durante muito tempo. Pensou na casa dos pais, na mesa grande da cozinha e nas conversas que duravam até de madrugada. Talvez fosse altura de pintar as paredes e consertar o telhado.""",
    ),
    "dutch": (
        "Latin",
        """\
Elke zaterdag fietste Pieter met zijn dochter naar de markt in het centrum van de stad. Ze kochten verse groenten, kaas van de boer en soms een bos tulpen voor op de keukentafel.

De marktkoopman kende hen al jaren en gaf het meisje altijd een appel of een stukje stroopwafel. "Je wordt elke week groter," zei hij dan, en zij lachte verlegen terwijl ze haar fiets vasthield.

Op de terugweg stopten ze bij de gracht om naar de boten te kijken. Het water was glad en grijs, en in de verte luidden de klokken van de oude kerk.""",
    ),
    "polish": (
        "Latin",
        """\
Zima w górach była w tym roku wyjątkowo mroźna. Śnieg zasypał drogę prowadzącą do schroniska, więc turyści musieli iść pieszo przez las, brnąc w zaspach po kolana.

Gospodarz schroniska, starszy mężczyzna o siwej brodzie, czekał na nich z gorącą herbatą i zupą grzybową. Opowiadał, że od czterdziestu lat nie widział tak dużych opadów i że wilki podchodzą coraz bliżej wsi.

Wieczorem wszyscy usiedli przy kominku. Ktoś wyjął gitarę, ktoś inny zaczął śpiewać starą piosenkę góralską, a za oknem wiatr gwizdał między świerkami.""",
    ),
    "russian": (
        "Cyrillic",
        """\
Поезд медленно подходил к станции, и за окном уже виднелись огни небольшого городка. Анна собрала вещи и посмотрела на часы: было почти десять вечера, а её должны были встретить ещё в восемь.

На перроне стоял только дежурный в тёплой шапке. Он объяснил, что автобус в деревню ушёл час назад, а следующий будет только утром. «Можете переночевать в гостинице у вокзала, — сказал он, — там чисто и недорого».

Гостиница оказалась старым двухэтажным домом с деревянной лестницей. Хозяйка напоила Анну чаем с вареньем и долго расспрашивала о Москве, о ценах и о том, как теперь живут молодые.""",
    ),
    "ukrainian": (
        "Cyrillic",
        """\
Навесні наше село оживає: люди виходять на городи, садять картоплю й цибулю, а діти бігають до річки дивитися, як тане лід. Повітря пахне землею і димом від багать, у яких палять торішнє листя.

Моя бабуся щоранку ходила до криниці по воду, навіть коли в хаті вже був водогін. Вона казала, що вода з криниці смачніша і що чай з неї зовсім інший.

Увечері всі збиралися на лавці біля хати. Сусіди розповідали новини, дід грав на сопілці, а ми слухали й дивилися, як над ставком сідає сонце.""",
    ),
    "greek": (
        "Greek",
        """\
Το μικρό νησί είχε μόνο ένα χωριό, χτισμένο στην πλαγιά του λόφου πάνω από το λιμάνι. Τα σπίτια ήταν άσπρα με μπλε παράθυρα, και τα στενά σοκάκια ανέβαιναν με σκαλοπάτια ως την εκκλησία.

Κάθε πρωί ο Νίκος κατέβαινε στο λιμάνι για να βοηθήσει τον πατέρα του με τα δίχτυα. Το καλοκαίρι έρχονταν τουρίστες με το καράβι της Αθήνας, και η ταβέρνα της θείας του γέμιζε κόσμο μέχρι αργά το βράδυ.

Τον χειμώνα όμως το νησί ησύχαζε. Ο αέρας φυσούσε δυνατά, το καράβι ερχόταν μόνο δύο φορές την εβδομάδα, και οι γέροι έπαιζαν τάβλι στο καφενείο κοιτάζοντας τη θάλασσα.""",
    ),
    "turkish": (
        "Latin",
        """\
İstanbul'un eski mahallelerinden birinde, dar bir sokağın köşesinde küçük bir kitapçı vardı. Dükkânın sahibi Ahmet Bey, kitapları raflara değil, yere ve masalara üst üste yığardı.

Müşteriler aradıkları kitabı bulmak için bazen saatlerce karıştırırdı, ama kimse şikâyet etmezdi. Ahmet Bey her gelene çay ikram eder, okudukları kitaplar hakkında sorular sorardı.

Yıllar sonra dükkân kapandığında mahallede herkes üzüldü. Şimdi orada bir kafe var, ama eski müşteriler hâlâ o köşeden geçerken durup vitrine bakıyor.""",
    ),
    "arabic": (
        "Arabic",
        """\
في صباح يوم الجمعة، خرج سالم مع والده إلى السوق القديم في وسط المدينة. كانت الأزقة الضيقة مزدحمة بالناس، ورائحة التوابل والقهوة تملأ المكان.

توقفا عند دكان صغير يبيع الكتب المستعملة، وبدأ سالم يقلب صفحات كتاب قديم عن تاريخ الأندلس. قال له البائع إن هذا الكتاب طُبع في القاهرة قبل أكثر من خمسين عاماً، وإنه من أندر ما عنده.

اشترى الوالد الكتاب لابنه، ثم جلسا في مقهى قريب يشربان الشاي بالنعناع. وبينما كانت الشمس ترتفع فوق المآذن، حدّثه أبوه عن رحلاته أيام الشباب وعن المدن التي زارها.""",
    ),
    "hebrew": (
        "Hebrew",
        """\
בבוקר של יום שישי השוק היה מלא אנשים. הרוכלים צעקו את המחירים, והריח של לחם טרי ותבלינים התפשט בין הדוכנים הצפופים.

רונית קנתה ירקות לסלט, גבינה וחלה גדולה לארוחת הערב. בדרך חזרה היא עצרה אצל הדוכן של יוסי, שמוכר פרחים כבר שלושים שנה, ובחרה זר של כלניות אדומות.

בערב כל המשפחה התאספה סביב השולחן. הילדים סיפרו על השבוע בבית הספר, הסבא שר שיר ישן, וכולם נשארו לשבת יחד עד מאוחר בלילה.""",
    ),
    "persian": (
        "Arabic",
        """\
در روستای ما، بهار با بوی شکوفه‌های بادام شروع می‌شد. کشاورزان زمین‌ها را شخم می‌زدند و بچه‌ها بعد از مدرسه به باغ‌ها می‌رفتند تا زیر درخت‌ها بازی کنند.

پدربزرگم هر روز صبح زود بیدار می‌شد و به جوی آب سر می‌زد. او می‌گفت آب زندگی است و باید مثل چشم از آن مراقبت کرد.

شب‌ها همه دور کرسی جمع می‌شدیم و مادربزرگ برایمان قصه‌های قدیمی تعریف می‌کرد؛ قصه‌هایی از پادشاهان، پهلوانان و پرندگانی که حرف می‌زدند.""",
    ),
    "hindi": (
        "Devanagari",
        """\
हमारे गाँव में बरसात का मौसम सबसे सुंदर होता था। पहली बारिश के बाद मिट्टी की खुशबू पूरे गाँव में फैल जाती थी और बच्चे कागज़ की नावें बनाकर नालियों में छोड़ते थे।

मेरी दादी आँगन में बैठकर अचार बनाती थीं और हमें पुरानी कहानियाँ सुनाती थीं। वे कहती थीं कि मेहनत और ईमानदारी से बड़ा कोई धन नहीं होता।

शाम को सब लोग चौपाल पर इकट्ठा होते थे। बुज़ुर्ग खेती और मौसम की बातें करते, और हम बच्चे पेड़ के नीचे बैठकर तारे गिनते रहते।""",
    ),
    "bengali": (
        "Bengali",
        """\
শীতের সকালে আমাদের গ্রামের মাঠ কুয়াশায় ঢাকা থাকত। খেজুর গাছ থেকে রস নামানো হতো, আর মা সেই রস দিয়ে পায়েস রান্না করতেন।

স্কুলে যাওয়ার পথে আমরা নদীর ধারে দাঁড়িয়ে নৌকা দেখতাম। মাঝিরা জাল ফেলত, আর দূরে হাটের দিকে মানুষের ভিড় জমতে শুরু করত।

সন্ধ্যায় বাড়ির উঠোনে সবাই মিলে গল্প করত। দাদু পুরোনো দিনের কথা বলতেন, আর আমরা চুপ করে শুনতাম।""",
    ),
    "thai": (
        "Thai",
        """\
ทุกเช้าคุณยายจะตื่นแต่เช้ามืดเพื่อไปตลาดริมแม่น้ำ ที่นั่นมีเรือพายขายผัก ผลไม้ และขนมไทยหลายชนิด เสียงพ่อค้าแม่ค้าเรียกลูกค้าดังไปทั่ว

ฉันชอบตามคุณยายไปด้วยเสมอ เพราะท่านจะซื้อขนมครกให้กินระหว่างทาง คุณยายบอกว่าการเลือกผลไม้ต้องดูสีและดมกลิ่นก่อนเสมอ

ตอนบ่ายเราจะนั่งพักใต้ต้นมะม่วงหลังบ้าน ฟังเสียงนกร้องและลมพัดเบา ๆ ผ่านใบไม้ ช่วงเวลาเหล่านั้นเป็นความทรงจำที่ฉันไม่เคยลืม""",
    ),
    "vietnamese": (
        "Latin",
        """\
Quê tôi là một làng nhỏ bên bờ sông Hồng. Mỗi sáng, mẹ tôi dậy từ rất sớm để nấu cơm, rồi gánh rau ra chợ bán trước khi mặt trời mọc.

Vào mùa gặt, cả làng cùng ra đồng. Người lớn cắt lúa, trẻ con mang nước và cơm nắm cho mọi người. Tiếng cười nói vang khắp cánh đồng vàng óng.

Buổi tối, ông tôi thường ngồi dưới gốc cây đa đầu làng, kể chuyện ngày xưa cho lũ trẻ nghe. Chúng tôi ngồi im lặng, mắt tròn xoe, chờ đến đoạn kết của mỗi câu chuyện.""",
    ),
    "chinese": (
        "Han",
        """\
小时候，我最喜欢在外婆家过暑假。外婆住在江南的一个小镇上，门前有一条小河，河上有一座古老的石桥。每天早上，镇上的人都会到河边洗衣服、买菜。

外婆做的红烧肉特别好吃，她说秘诀就是火候和耐心。吃完晚饭，我们常常坐在院子里乘凉，一边吃西瓜，一边听她讲过去的故事。

后来我去了北京上大学，回去的机会越来越少。可是每当夏天来临，我总会想起那条小河、那座石桥，还有外婆温暖的笑容。""",
    ),
    "japanese": (
        "Kana+Han",
        """\
週末になると、祖父はいつも近所の公園へ散歩に出かけた。季節ごとに咲く花の名前をよく知っていて、歩きながら一つひとつ教えてくれた。

春には桜、夏には紫陽花、秋には紅葉。祖父は写真を撮るのも好きで、古いカメラをいつも首から下げていた。現像した写真は、アルバムにきちんと日付を書いて整理していた。

今でもそのアルバムを開くと、祖父の声が聞こえてくるような気がする。「急がなくていい。よく見てごらん」と、いつも言っていた。""",
    ),
    "korean": (
        "Hangul",
        """\
어릴 때 우리 가족은 매년 추석이면 시골 할머니 댁에 갔다. 기차를 타고 몇 시간을 달려야 했지만, 창밖으로 보이는 황금빛 논과 산이 너무 아름다워서 지루하지 않았다.

할머니는 우리가 도착하기 전날부터 송편을 빚고 전을 부치셨다. 온 가족이 모여 앉아 음식을 나누며 이야기꽃을 피웠고, 밤에는 마당에 나가 보름달을 바라보며 소원을 빌었다.

지금은 할머니가 계시지 않지만, 추석이 되면 그때의 따뜻한 기억이 떠오른다. 우리는 여전히 그 시골집에 모여 할머니가 가르쳐 주신 방법대로 송편을 만든다.""",
    ),
    "georgian": (
        "Georgian",
        """\
ჩვენი სოფელი მთების ძირში მდებარეობს. შემოდგომაზე ყველა ოჯახი ყურძენს კრეფს და ღვინოს აყენებს ძველ ქვევრებში, როგორც ამას ჩვენი წინაპრები აკეთებდნენ.

ბებია საღამოობით თონეში პურს აცხობდა, ჩვენ კი ეზოში ვთამაშობდით. სუფრასთან ყოველთვის სტუმრები ისხდნენ და სიმღერა გვიან ღამემდე არ წყდებოდა.""",
    ),
    "armenian": (
        "Armenian",
        """\
Մեր գյուղը գտնվում է լեռների միջև, մի փոքրիկ գետի ափին։ Ամռանը երեխաները լողանում էին գետում, իսկ մեծերը աշխատում էին այգիներում ու դաշտերում։

Տատիկս ամեն առավոտ լավաշ էր թխում թոնրի մեջ։ Նա ասում էր, որ հացը պետք է պատրաստել սիրով ու համբերությամբ, այլապես այն համեղ չի լինի։""",
    ),
    "tamil": (
        "Tamil",
        """\
எங்கள் ஊரில் பொங்கல் பண்டிகை மிகவும் சிறப்பாகக் கொண்டாடப்படும். வீடுகளின் முன்னால் வண்ணக் கோலங்கள் போடப்படும், புதுப் பானையில் பொங்கல் சமைக்கப்படும்.

என் பாட்டி அதிகாலையிலேயே எழுந்து எல்லா வேலைகளையும் செய்து முடிப்பார். மாலையில் குடும்பத்தினர் அனைவரும் ஒன்றாக அமர்ந்து உணவு உண்டு மகிழ்வோம்.""",
    ),
    "amharic": (
        "Ethiopic",
        """\
በልጅነቴ በየእሁዱ ከአያቴ ጋር ወደ ገበያ እሄድ ነበር። ገበያው በሰዎች፣ በእንስሳትና በሸቀጦች የተሞላ ነበር።

አያቴ ቡና ሲያፈሉ ቤቱ በሙሉ በመልካም መዓዛ ይሞላ ነበር። ጎረቤቶች ተሰብስበው ስለ ዝናብና ስለ አዝመራ ይጨዋወቱ ነበር።""",
    ),
}

# name -> source text
CODE: dict[str, str] = {
    "python": '''\
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Record:
    name: str
    score: float = 0.0


def load_records(path: Path) -> list[Record]:
    """Read `name,score` lines, skipping comments and blank lines."""
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, score = line.split(",")
            records.append(Record(name.strip(), float(score)))
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
    return sorted(records, key=lambda r: -r.score)
''',
    "javascript": """\
export async function fetchUsers(baseUrl, { limit = 20, signal } = {}) {
  const url = new URL("/api/users", baseUrl);
  url.searchParams.set("limit", String(limit));
  const response = await fetch(url, { signal, headers: { Accept: "application/json" } });
  if (!response.ok) {
    throw new Error(`request failed: ${response.status} ${response.statusText}`);
  }
  const { users = [] } = await response.json();
  return users.filter((u) => u.active).map(({ id, name }) => ({ id, name }));
}
""",
    "rust": """\
use std::collections::HashMap;

/// Counts how often each word occurs, ignoring case.
pub fn word_counts(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
        if !word.is_empty() {
            *counts.entry(word).or_insert(0) += 1;
        }
    }
    counts
}
""",
    "c": """\
#include <stdio.h>
#include <stdlib.h>

/* Returns a newly allocated copy of `src` reversed; the caller frees it. */
char *reverse(const char *src, size_t len) {
    char *out = malloc(len + 1);
    if (out == NULL) return NULL;
    for (size_t i = 0; i < len; i++) out[i] = src[len - 1 - i];
    out[len] = '\\0';
    return out;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *r = reverse(argv[i], strlen(argv[i]));
        printf("%s\\n", r);
        free(r);
    }
    return 0;
}
""",
    "go": """\
package main

import (
	"fmt"
	"net/http"
	"time"
)

func main() {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://localhost:8000/health")
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	defer resp.Body.Close()
	fmt.Printf("status %d\\n", resp.StatusCode)
}
""",
    "sql": """\
SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue
FROM customers AS c
LEFT JOIN orders AS o ON o.customer_id = c.id AND o.created_at >= DATE '2024-01-01'
WHERE c.country IN ('FR', 'DE', 'IT')
GROUP BY c.name
HAVING COUNT(o.id) > 3
ORDER BY revenue DESC
LIMIT 10;
""",
    "html": """\
<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Status</title>
    <style>body { font-family: system-ui, sans-serif; margin: 2rem; }</style>
  </head>
  <body>
    <h1 id="title">All systems operational</h1>
    <ul class="services"><li data-state="ok">API</li><li data-state="ok">Database</li></ul>
  </body>
</html>
""",
    "shell": """\
#!/usr/bin/env bash
set -euo pipefail
for f in "$@"; do
  if [[ -f "$f" ]]; then
    lines=$(wc -l < "$f")
    echo "$f: $lines lines"
  else
    echo "skipping $f" >&2
  fi
done | sort -t: -k2 -n
""",
    "java": """\
import java.util.List;
import java.util.stream.Collectors;

public final class Names {
    private Names() {}

    public static List<String> initials(List<String> names) {
        return names.stream()
                .filter(n -> n != null && !n.isBlank())
                .map(n -> n.substring(0, 1).toUpperCase())
                .collect(Collectors.toList());
    }
}
""",
}
