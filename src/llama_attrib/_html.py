"""The inline CSS and JavaScript of :func:`llama_attrib.views.to_html` (no CDN, no network).

``SCRIPT`` is a function expression called with the id of its container, so that several
results in one notebook or page do not interfere. Colours: a diverging map from blue
(negative) through white (0) to red (positive), scaled per selected step to the largest
absolute score of that step, the first token (an attention sink) and what lies outside a
sentence view's sentences left out of that scale (:func:`llama_attrib.views.to_html`).
"""

STYLE = """
.la-attrib{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;
  line-height:1.9;color:#222;max-width:60em}
.la-attrib .la-help{font-family:system-ui,sans-serif;font-size:12px;color:#555;margin-bottom:4px}
.la-attrib .la-text{white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;padding:6px;
  background:#fff}
.la-attrib .la-tok{border-radius:3px;padding:1px 0;background-color:transparent}
.la-attrib .la-special{color:#888}
.la-attrib .la-gen{cursor:pointer;text-decoration:underline dotted #666;font-weight:600}
.la-attrib .la-gen:hover{outline:1px solid #999}
.la-attrib .la-selected{outline:2px solid #111}
.la-attrib .la-legend{display:flex;align-items:center;gap:6px;margin-top:6px;
  font-family:system-ui,sans-serif;font-size:12px}
.la-attrib .la-bar{display:inline-block;width:180px;height:12px;border:1px solid #aaa;
  background:linear-gradient(to right,rgb(33,102,172),rgb(255,255,255),rgb(178,24,43))}
.la-attrib .la-info{margin-left:12px;color:#333}
.la-attrib .la-overview{border-collapse:collapse;margin-top:8px;font-size:11px}
.la-attrib .la-overview td{width:9px;height:13px;padding:0;border:1px solid #fff}
.la-attrib .la-overview td.la-ov-label{width:auto;padding-right:6px;white-space:nowrap;
  font-family:system-ui,sans-serif;color:#333;border:none}
.la-attrib .la-ov-row{cursor:pointer}
.la-attrib .la-ov-row.la-ov-selected td.la-ov-label{font-weight:700}
.la-attrib .la-controls{font-family:system-ui,sans-serif;font-size:12px;margin-bottom:4px;
  display:flex;gap:12px;align-items:center}
.la-attrib .la-answer.la-on{font-weight:700}
.la-attrib .la-hidden{display:none}
.la-attrib .la-fold-mark{color:#777;background:#f2f2f2;border-radius:3px;cursor:pointer;
  padding:0 3px;font-family:system-ui,sans-serif;font-size:12px}
.la-attrib .la-ranking{font-family:system-ui,sans-serif;font-size:12px;margin:6px 0;padding-left:2em}
.la-attrib .la-ranking li{cursor:pointer}
.la-attrib .la-ranking li:hover{text-decoration:underline}
.la-attrib .la-ranking li.la-unsupported{color:#888;text-decoration:line-through}
.la-attrib .la-together{font-family:system-ui,sans-serif;font-size:12px;color:#555}
.la-attrib .la-marked{outline:2px solid #e6a100}
"""

SCRIPT = r"""function(uid){
  var root=document.getElementById(uid);
  var data=JSON.parse(root.querySelector('script.la-data').textContent);
  var apart={}; (data.apart||[]).forEach(function(i){apart[i]=true;});  /* not in the colour scale */
  var toks=root.querySelectorAll('.la-tok');
  var NEG=[33,102,172], POS=[178,24,43];
  function colour(v,vmax){
    var t=Math.min(1,Math.abs(v)/vmax), end=v<0?NEG:POS, c=[0,0,0];
    for(var j=0;j<3;j++){c[j]=Math.round(255+(end[j]-255)*t);}
    return 'rgb('+c[0]+','+c[1]+','+c[2]+')';
  }
  function fmt(v){return (v>=0?'+':'')+v.toPrecision(4);}
  var text=root.querySelector('.la-text'), fold=root.querySelector('.la-fold');
  var answerButton=root.querySelector('.la-answer'), current=null;
  fold.checked=!!data.collapse;
  function unfold(){
    text.querySelectorAll('.la-fold-mark').forEach(function(m){m.remove();});
    for(var i=0;i<toks.length;i++){toks[i].classList.remove('la-hidden');}
  }
  function refold(row,limit,vmax){
    unfold();
    if(!fold.checked){return;}
    var start=-1;
    for(var i=0;i<=limit;i++){
      var low=i<limit && (row[i]===null || Math.abs(row[i])<0.05*vmax) &&
        !toks[i].classList.contains('la-marked');
      if(low && start<0){start=i;}
      if(!low && start>=0){
        if(i-start>=12){
          var mark=document.createElement('span'), first=start, end=i;
          mark.className='la-fold-mark';
          mark.textContent='[… '+(end-first)+' tokens …]';
          mark.title='text that scores little here: click to open';
          mark.addEventListener('click',function(a,b,m){return function(){
            for(var j=a;j<b;j++){toks[j].classList.remove('la-hidden');} m.remove();};}(first,end,mark));
          toks[first].parentNode.insertBefore(mark,toks[first]);
          for(var j=first;j<end;j++){toks[j].classList.add('la-hidden');}
        }
        start=-1;
      }
    }
  }
  function paint(row,limit,what){
    var vmax=0;
    for(var i=0;i<limit;i++){ if(row[i]!==null && !apart[i]){vmax=Math.max(vmax,Math.abs(row[i]));} }
    if(vmax===0){vmax=1;}
    for(var i=0;i<toks.length;i++){
      var el=toks[i];
      el.classList.remove('la-selected');
      if(i<limit && row[i]!==null){
        el.style.backgroundColor=colour(row[i],vmax);
        el.style.color=Math.abs(row[i])/vmax>0.55?'#fff':'';
        el.title=(data.labels[i]||data.tokens[i])+': '+fmt(row[i])+' ('+data.unit+', '+what+')';
      } else {
        el.style.backgroundColor='transparent';
        el.style.color='';
        el.title=i<limit?'(left out)':'after the selected token';
      }
    }
    root.querySelector('.la-min').textContent=fmt(-vmax);
    root.querySelector('.la-max').textContent=fmt(vmax);
    refold(row,limit,vmax);
  }
  function shareText(shares){
    var names=Object.keys(shares);
    if(!names.length){return '';}
    return ' (no token: '+names.map(function(n){return n+' '+shares[n].toFixed(4);}).join(', ')+')';
  }
  function select(step){
    current=step;
    answerButton.classList.remove('la-on');
    var row=data.scores[step], limit=data.prompt_length+step;
    paint(row,limit,'step '+step);
    toks[limit].classList.add('la-selected');
    root.querySelectorAll('.la-ov-row').forEach(function(r){
      r.classList.toggle('la-ov-selected',parseInt(r.getAttribute('data-step'),10)===step);
    });
    root.querySelector('.la-info').textContent='step '+step+': '+JSON.stringify(data.tokens[limit])+
      ', logit '+data.logits[step].toFixed(4)+
      shareText(data.shares[step])+
      '; colours: '+data.unit;
  }
  function answer(){
    current='answer';
    answerButton.classList.add('la-on');
    root.querySelectorAll('.la-ov-row').forEach(function(r){r.classList.remove('la-ov-selected');});
    var limit=data.prompt_length+data.scores.length-1;
    paint(data.answer,limit,'whole answer');
    root.querySelector('.la-info').textContent='whole answer: '+data.scores.length+
      ' generated tokens, scores summed; colours: '+data.unit;
  }
  var list=root.querySelector('.la-ranking');
  var cited=data.citations;  /* verified: share and measured drop each, re-ranked by the drop */
  (cited?cited.rows:data.ranking).forEach(function(r){
    var li=document.createElement('li');
    var label=r.label.replace(/\s+/g,' ').trim();
    li.textContent=(100*r.share).toFixed(1)+'%  '+fmt(r.score)+'  '+
      (cited?'drop '+r.drop.toFixed(3)+' nats  '+(r.supported?'':'(not supported)  '):'')+
      (label.length>90?label.slice(0,90)+'…':label);
    li.title=r.label;
    if(cited){
      li.classList.add(r.supported?'la-supported':'la-unsupported');
      li.setAttribute('data-drop',String(r.drop));
      li.title+=r.supported?'':'\nremoving it does not lower the answer\'s log-probability';
    }
    li.addEventListener('click',function(){
      for(var i=0;i<toks.length;i++){toks[i].classList.remove('la-marked');}
      r.tokens.forEach(function(i){toks[i].classList.add('la-marked');});
      if(current==='answer'){answer();}else if(current!==null){select(current);}
      if(r.tokens.length){toks[r.tokens[0]].scrollIntoView({block:'center'});}
    });
    list.appendChild(li);
  });
  if(cited){
    var together=document.createElement('div');
    together.className='la-together';
    together.textContent='verified: each source removed from the prompt in turn; the drop of '+
      'the answer\'s log-probability, re-ranked by it; all '+cited.rows.length+' removed at once: '+
      cited.together.toFixed(3)+' nats';
    list.parentNode.insertBefore(together,list);
  }
  answerButton.addEventListener('click',answer);
  fold.addEventListener('change',function(){
    if(current==='answer'){answer();}else if(current!==null){select(current);}
  });
  root.querySelectorAll('.la-gen, .la-ov-row').forEach(function(el){
    el.addEventListener('click',function(){select(parseInt(el.getAttribute('data-step'),10));});
  });
  if(data.scores.length){select(data.scores.length-1);}
}"""
